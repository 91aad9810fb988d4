"""A coordinator and two nodes, each in its own network namespace with a tc-shaped veth, the nodes reaching the
coordinator through emulated ``home`` links (latency, jitter, loss stalls) on the bridge: the run trains with
identical replicas, and every node's uplink carried its frames. Needs root (CAP_NET_ADMIN): skipped otherwise,
with the reason."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dht_runs import signed_run
from lowband_cluster import Proc, applied_rounds, check_replicas, rounds_table, wait_all_exit, wait_for, write_run_file
from node.netem import netns
from node.netem.link import Link
from node.netem.profiles import between_hosts, get_profile

OK, WHY = netns.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"network namespaces unavailable: {WHY}")


def spawn_in(topo: netns.Topology, host: str, args: list[str], tmp_path: Path, procs: list[Proc]) -> Proc:
    """``lowband ARGS`` inside ``host``'s namespace, logging to tmp_path; added to ``procs`` (killed at the end)."""
    out, err = tmp_path / f"{host}.stdout", tmp_path / f"{host}.log"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        popen = subprocess.Popen([*topo.prefix_cmd(host), sys.executable, "-m", "node.cli", *args],
                                 stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, start_new_session=True)
    proc = Proc(host, popen, out, err, tmp_path / host)
    procs.append(proc)
    return proc


def tear_down(procs: list[Proc], links: list[Link], topo: netns.Topology) -> None:
    for p in procs:
        if p.alive():
            p.kill9()
    for link in links:
        link.stop()
    topo.teardown()


@pytest.mark.timeout(180)
def test_a_run_across_namespaces_and_emulated_links(tmp_path: Path) -> None:
    home = get_profile("home")
    relay_profile = dataclasses.replace(home, up_bps=0.0, down_bps=0.0)  # the kernel shapes the bandwidth
    procs: list[Proc] = []
    links: list[Link] = []
    topo = netns.Topology(prefix=f"lbt{tmp_path.name[-3:].replace('_', '')}", subnet="10.78.0")
    try:
        run = write_run_file(tmp_path / "run.toml", rounds=3, min_nodes=2)
        coord_ip = topo.add_host("coord")

        def spawn(host: str, args: list[str]) -> Proc:
            return spawn_in(topo, host, args, tmp_path, procs)

        # a private emulated network: plaintext on purpose (--insecure), with the join token a run off loopback needs
        secure = ["--insecure", "--join-token", "netns-test-token"]
        coord = spawn("coord", ["coordinator", "--listen", f"{coord_ip}:0", "--state-dir", str(tmp_path / "state"),
                                "--run", str(run), *secure])

        def address() -> str | None:
            assert coord.alive(), coord.log_text()[-2000:]
            for line in coord.stdout.read_text(errors="replace").splitlines():
                if "listening on" in line:
                    return line.rsplit(" ", 1)[-1]
            return None

        port = int(wait_for("the coordinator's address", address, 60).rsplit(":", 1)[1])
        nodes = []
        for name in ("a", "b"):
            ip = topo.add_host(name, home.up_bps, home.down_bps)
            assert ip != coord_ip
            link = Link((coord_ip, port), relay_profile, listen_host=topo.gateway, seed=len(links), name=name)
            link.start()
            links.append(link)
            nodes.append(spawn(name, ["node", "--coordinator", link.address, "--workdir", str(tmp_path / name),
                                      "--name", name, "--device", "cpu", *secure]))
        assert wait_all_exit(nodes, timeout_s=150) == [0, 0], [n.log_text()[-2000:] for n in nodes]
        coord.popen.terminate()
        coord.popen.wait(timeout=30)
        rows = rounds_table(tmp_path / "state")
        assert [r.round for r in rows] == [0, 1, 2]
        check_replicas({n.name: tmp_path / n.name for n in nodes}, rows)
        frame = rows[0].bytes_in // len(rows[0].members)
        for link in links:  # every frame went up this node's link (plus gRPC framing and heartbeats)
            assert link.stats()["bytes_up"] >= 3 * frame
    finally:
        tear_down(procs, links, topo)


@pytest.mark.timeout(240)
def test_dht_peers_in_namespaces_reach_each_other_only_through_their_announced_relays(tmp_path: Path) -> None:
    """Serverless: each peer in its own namespace (tc-shaped veth) listens on its own address and announces a
    relay on the bridge (the path's latency, jitter and loss); every frame a peer fetched crossed a relay, so the
    peers dialed the announced addresses, not each other directly."""
    home = get_profile("home")
    procs: list[Proc] = []
    links: list[Link] = []
    topo = netns.Topology(prefix=f"lbd{tmp_path.name[-3:].replace('_', '')}", subnet="10.80.0")
    port = 4001  # inside a namespace of its own, where nothing else listens

    def spawn(host: str, args: list[str]) -> Proc:
        return spawn_in(topo, host, args, tmp_path, procs)

    try:
        run = signed_run(tmp_path / "run.toml", open_run=True, rounds=3, min_nodes=2, run_id="it-dht-netns")
        boot_ip = topo.add_host("boot")
        boot = spawn("boot", ["dht", "--listen", f"/ip4/{boot_ip}/tcp/{port}"])

        def boot_maddr() -> str | None:
            assert boot.alive(), boot.log_text()[-2000:]
            for line in boot.stdout.read_text(errors="replace").splitlines():
                if line.startswith("lowband dht peer ") and f"/{boot_ip}/" in line:
                    return line.rsplit(" ", 1)[-1]
            return None

        maddr = wait_for("the DHT peer's multiaddr", boot_maddr, 60)
        nodes = []
        for name in ("a", "b"):
            ip = topo.add_host(name, home.up_bps, home.down_bps)
            link = Link((ip, port), between_hosts(home), listen_host=topo.gateway, seed=len(links), name=name)
            link.start()
            links.append(link)
            nodes.append(spawn(name, ["node", "--dht", "--initial-peers", maddr, "--run", str(run),
                                      "--listen", f"/ip4/{ip}/tcp/{port}",
                                      "--announce", f"/ip4/{topo.gateway}/tcp/{link.port}",
                                      "--workdir", str(tmp_path / name), "--name", name, "--device", "cpu"]))
        assert wait_all_exit(nodes, timeout_s=180) == [0, 0], [n.log_text()[-2000:] for n in nodes]
        check_replicas({node.name: tmp_path / node.name for node in nodes}, None)
        fetched = 0
        for node in nodes:
            applied = applied_rounds(tmp_path / node.name)
            assert [e["round"] for e in applied] == [0, 1, 2], applied
            for e in applied:
                assert e["members"] == ["a", "b"], e
                fetched += e["bytes_in"]
        relayed = sum(link.stats()["bytes_up"] + link.stats()["bytes_down"] for link in links)
        assert fetched > 0 and relayed >= fetched, (relayed, fetched)
    finally:
        tear_down(procs, links, topo)
