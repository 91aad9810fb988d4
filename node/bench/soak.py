"""``lowband bench soak``: a long run under churn, then the invariants that churn must never break.

Coordinator mode: a coordinator and ``nodes`` node processes, each node behind its own emulated link (profile,
e.g. ``home``); a seeded ``node.netem.churn`` schedule kills/restarts, pauses (SIGSTOP/SIGCONT), partitions
(black hole, then reset) and adds nodes, and kills/restarts the coordinator. DHT mode: a bootstrap peer and
nodes over hivemind, with the same node events. Where namespaces can be made (root), each DHT peer is a host of
its own (``node.netem.netns``): its veth is shaped by ``tc`` to the profile's bandwidth, it announces a relay in
front of it that adds the path's latency, jitter, loss and outages (every libp2p connection is dialed through
the dialee's relay), and a partition takes its veth down. Without namespaces the peers share loopback
unshaped and a partition is played as a pause; the report's ``links`` says which.

Checked afterwards (``SoakReport.problems`` lists every violation; empty means the run passed):
- no process that the schedule did not kill exited before the end, and every survivor exits 0 on SIGTERM;
- the invariants of ``node.bench.invariants.replica_problems``: every node's round log applies rounds in order,
  each exactly once (a state adoption may skip ahead); coordinator mode: every applied round is one the
  coordinator committed, with its fingerprint and members; in both modes every node that applied a round has
  the same fingerprint and members for it (replica-consistent recipes);
- the final validation loss (the last checkpoint's reference, evaluated on the task's validation split).
"""
from __future__ import annotations

import json
import logging
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.bench.invariants import agreed_fingerprints, applied, replica_problems
# the name tests/fault/daemon_harness.py imports; the checker itself lives in node/bench/invariants.py
from node.bench.procs import (child_env, read_coordinator_address, read_dht_address, signal_group, spawn_lowband,
                              stop_group)
from node.netem import netns as nsmod
from node.netem.churn import ChurnEvent, random_schedule
from node.netem.link import Link
from node.netem.profiles import between_hosts, describe, get_profile
from node.roundlog import coordinator_rounds, read_round_log
from node.runfile import build_run_file

log = logging.getLogger(__name__)
P2P_PORT = 4001  # a DHT peer's port inside its own namespace, where nothing else listens: it cannot collide

@dataclass
class SoakConfig:
    mode: str = "coordinator"  # or "dht"
    nodes: int = 6
    rounds: int = 100
    events: int = 20
    coordinator_restarts: int = 2
    profile: str = "home"
    seed: int = 1
    recipe: str = "sign"
    size: str = "tiny"
    H: int = 4
    timeout_s: float = 3600.0
    netns: bool | None = False  # DHT mode: a namespace and shaped link per peer (None: where root allows it)


@dataclass
class SoakReport:
    config: dict[str, Any]
    schedule: list[dict[str, Any]]
    committed_rounds: int = 0
    applied: dict[str, int] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    survivors: list[str] = field(default_factory=list)  # nodes the schedule left running at the end
    final_val_loss: float = float("nan")
    links: str = ""  # how the links were emulated
    relayed_bytes: dict[str, int] = field(default_factory=dict)  # per node: both directions through its relay
    wall_s: float = 0.0
    exchange_s_median: float = float("nan")  # a round's exchange as the nodes logged it (``wait_s``), first rounds out
    round_s_median: float = float("nan")  # time between a node's consecutive applied rounds
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def soak_run_file(cfg: SoakConfig) -> str:
    """Short rounds (small batches, short waits and leases) so that churn meets many of them."""
    return build_run_file(run_id="soak", recipe=cfg.recipe, rounds=cfg.rounds,
                          task_params={"size": cfg.size, "batch_size": 4, "block_size": 64},
                          recipe_overrides={"H": cfg.H},
                          membership={"min_nodes": 2, "max_nodes": 64, "heartbeat_s": 0.5, "lease_s": 4.0},
                          rounds_policy={"initial_wait_s": 10.0, "min_wait_s": 1.0, "max_wait_s": 10.0,
                                         "eval_every": 0})


def final_val_loss(workdir: Path, run_file: Path) -> float:
    """The validation loss of the reference in a node's last checkpoint."""
    from node.runfile import load_run_file
    from node.tasks import load_task
    from node.train.export import checkpoint_bytes, model_from_state

    cfg = load_run_file(run_file).run
    model, _ = model_from_state(checkpoint_bytes(workdir))
    return float(load_task(cfg.task.name, **cfg.task.params).evaluate(model))


class Soak:
    STALL_S = 20.0  # no round for this long: bring back the nodes that are out (restarts, resumes, heals)

    def __init__(self, cfg: SoakConfig, root: Path) -> None:
        self.cfg, self.root = cfg, root
        self.profile = get_profile(cfg.profile)
        self.procs: dict[str, subprocess.Popen] = {}
        self.expected_dead: set[str] = set()
        self.killed: set[str] = set()  # nodes the schedule killed at some point (the invariants allow for them)
        self.paused: set[str] = set()
        self.links: dict[str, Link] = {}
        self.topo: nsmod.Topology | None = None
        self.links_note = f"loopback, each node through a relay ({describe(self.profile)})"
        self.problems: list[str] = []
        self.coord_port = 0
        self.coordinator_down_at = 0.0
        self.initial_peers = ""
        self.run_file = root / "run.toml"
        self.run_file.write_text(soak_run_file(cfg))
        if cfg.mode == "dht":  # serverless runs are signed by their authority; open: the soak's nodes come and go
            from node.transport.dht_authority import init_run

            init_run(self.run_file, self.run_file, root / "authority.key", open_run=True)
        self.env = child_env()

    # -- processes ------------------------------------------------------------------------------------------
    def start_coordinator(self) -> None:
        listen = f"127.0.0.1:{self.coord_port}"
        proc = spawn_lowband(["coordinator", "--listen", listen, "--state-dir", str(self.root / "state"),
                              "--run", str(self.run_file)], self.root / "coordinator.log", stdout=subprocess.PIPE,
                             env=self.env)
        self.coord_port = int(read_coordinator_address(proc, 120).rsplit(":", 1)[1])
        self.procs["coordinator"] = proc
        self.expected_dead.discard("coordinator")

    def use_netns(self) -> None:
        """DHT mode: one namespace per peer where it can be had (see the module docstring)."""
        self.links_note = "loopback, unshaped: a partition is played as a pause"
        if self.cfg.netns is False:
            return
        ok, why = nsmod.available()
        if not ok:
            if self.cfg.netns:
                raise RuntimeError(f"network namespaces were asked for but cannot be made: {why}")
            self.links_note += f" (no namespaces: {why})"
            return
        self.topo = nsmod.Topology(prefix="lbs", subnet="10.79.0")  # apart from bench network's and the tests'
        self.links_note = (f"a namespace per peer, veth shaped by tc tbf, a relay per peer for the path between two "
                           f"hosts ({describe(between_hosts(self.profile))}); a partition takes the veth down")

    def start_boot(self) -> None:
        host, listen, prefix = "127.0.0.1", "/ip4/127.0.0.1/tcp/0", None
        if self.topo is not None:
            host = self.topo.add_host("boot")
            listen, prefix = f"/ip4/{host}/tcp/{P2P_PORT}", self.topo.prefix_cmd("boot")
        proc = spawn_lowband(["dht", "--listen", listen], self.root / "dht.log", stdout=subprocess.PIPE,
                             prefix=prefix, env=self.env)
        self.procs["dht"] = proc
        self.initial_peers = read_dht_address(proc, 120, host)

    def start_node(self, name: str) -> None:
        prefix = None
        if self.cfg.mode == "dht":
            where = ["--dht", "--initial-peers", self.initial_peers, "--run", str(self.run_file)]
            if self.topo is None:
                where += ["--listen", "/ip4/127.0.0.1/tcp/0"]
            else:
                if name not in self.topo.hosts:
                    host = self.topo.add_host(name, self.profile.up_bps, self.profile.down_bps)
                    link = Link((host, P2P_PORT), between_hosts(self.profile), seed=len(self.links),
                                name=f"{name}-p2p", listen_host=self.topo.gateway)
                    link.start()
                    self.links[name] = link
                where += ["--listen", f"/ip4/{self.topo.address(name)}/tcp/{P2P_PORT}",
                          "--announce", f"/ip4/{self.topo.gateway}/tcp/{self.links[name].port}"]
                prefix = self.topo.prefix_cmd(name)
        else:
            if name not in self.links:
                link = Link(("127.0.0.1", self.coord_port), self.profile, seed=len(self.links), name=name)
                link.start()
                self.links[name] = link
            where = ["--coordinator", self.links[name].address, "--run", str(self.run_file)]
        self.procs[name] = spawn_lowband(["node", *where, "--workdir", str(self.root / name), "--name", name,
                                          "--device", "cpu"], self.root / f"{name}.log", prefix=prefix, env=self.env)
        self.expected_dead.discard(name)

    def is_down(self, name: str) -> bool:
        return name not in self.procs or self.procs[name].poll() is not None

    def signal_group(self, name: str, sig: signal.Signals) -> None:
        signal_group(self.procs[name], sig)

    def kill(self, name: str) -> None:
        self.expected_dead.add(name)
        self.killed.add(name)
        self.signal_group(name, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    # -- progress -------------------------------------------------------------------------------------------
    def committed(self) -> int:
        """The run's progress as the nodes logged it (the coordinator may be down)."""
        best = 0
        for name in self.procs:
            applied = [e["round"] for e in read_round_log(self.root / name) if "round" in e]
            if applied:
                best = max(best, max(applied) + 1)
        return best

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name not in self.expected_dead and proc.poll() is not None:
                if proc.returncode == 0 and name not in ("coordinator", "dht") and self.committed() >= self.cfg.rounds:
                    continue  # a node leaves by itself after the run's last round
                self.problems.append(f"{name} exited with {proc.returncode} without being killed")
                self.expected_dead.add(name)

    def apply(self, event: ChurnEvent, later: list[ChurnEvent]) -> None:
        log.info("round %d: %s %s", self.committed(), event.action, event.target)
        a, t = event.action, event.target
        if a == "kill":
            self.kill(t)
        elif a in ("restart", "join"):
            if not self.is_down(t):  # never two processes on one workdir
                log.info("%s is running: no %s", t, a)
                return
            self.start_node(t)
        elif a == "pause" or (a == "partition" and self.cfg.mode == "dht" and self.topo is None):
            self.signal_group(t, signal.SIGSTOP)
            self.paused.add(t)
            later.append(ChurnEvent(event.at_round + max(1, event.duration_rounds), "restart", f"resume:{t}"))
        elif a == "partition":
            if self.topo is not None:
                self.topo.set_up(t, False)
            else:
                self.links[t].set_down(True)
            later.append(ChurnEvent(event.at_round + max(1, event.duration_rounds), "restart", f"heal:{t}"))
        elif a == "coordinator_kill":
            self.kill("coordinator")
            self.coordinator_down_at = time.monotonic()
        elif a == "coordinator_restart":
            # rounds cannot advance while it is down, so its outage is timed: a few heartbeats, not rounds
            time.sleep(max(0.0, self.coordinator_down_at + 3.0 - time.monotonic()))
            self.start_coordinator()

    def resume(self, token: str) -> None:
        kind, name = token.split(":", 1)
        if kind == "resume":
            self.signal_group(name, signal.SIGCONT)
            self.paused.discard(name)
        else:
            if self.topo is not None:
                self.topo.set_up(name, True)
            else:
                self.links[name].set_down(False)
            self.links[name].cut()  # what a NAT box does to connections that idled through an outage

    # -- the run --------------------------------------------------------------------------------------------
    def run(self) -> SoakReport:
        cfg = self.cfg
        names = [f"n{i}" for i in range(cfg.nodes)]
        schedule = random_schedule(cfg.seed, names, cfg.rounds, cfg.events,
                                   cfg.coordinator_restarts if cfg.mode == "coordinator" else 0)
        report = SoakReport(asdict(cfg), [e.to_dict() for e in schedule])
        if cfg.mode == "dht":
            self.use_netns()
        report.links = self.links_note
        started = time.monotonic()
        last_progress = [0, started]
        pending = list(schedule)
        try:
            self.start_coordinator() if cfg.mode == "coordinator" else self.start_boot()
            for name in names:
                self.start_node(name)
            while self.committed() < cfg.rounds:
                if time.monotonic() - started > cfg.timeout_s:
                    self.problems.append(f"timed out at round {self.committed()} after {cfg.timeout_s:.0f} s")
                    break
                self.check_alive()
                now = self.committed()
                if now > last_progress[0]:
                    last_progress[:] = [now, time.monotonic()]
                stalled = time.monotonic() - last_progress[1] > self.STALL_S
                # a pause or partition ends at its round, or once the run stalled without the node (e.g. below
                # quorum): an outage that outlives the run's ability to reach that round would hang the soak
                due = [e for e in pending if e.at_round <= now or (stalled and e.action == "restart" and
                                                                   (":" in e.target or self.is_down(e.target)))]
                for event in due:
                    pending.remove(event)
                    if event.action == "restart" and ":" in event.target:
                        self.resume(event.target)
                    else:
                        self.apply(event, pending)
                if not due:
                    time.sleep(0.2)  # polling the round logs
                if all(self.procs[n].poll() is not None for n in self.procs if n not in ("coordinator", "dht")):
                    break  # every node is done (or dead): nothing will make progress any more
            for name in list(self.paused):
                self.signal_group(name, signal.SIGCONT)
            self.check_alive()
        finally:
            report.exit_codes = self.stop_all()
            for name, link in self.links.items():
                link.stop()
                report.relayed_bytes[name] = link.bytes_up + link.bytes_down
            if self.topo is not None:
                self.topo.teardown()
        report.survivors = sorted(n for n in self.procs if n not in ("coordinator", "dht") and n not in self.expected_dead)
        report.wall_s = round(time.monotonic() - started, 1)
        self.verify(report)
        return report

    def stop_all(self) -> dict[str, int]:
        codes = {}
        nodes = [n for n in self.procs if n not in ("coordinator", "dht")]
        for name in nodes:
            if self.procs[name].poll() is None:
                self.signal_group(name, signal.SIGTERM)
        for name in nodes:
            try:
                codes[name] = self.procs[name].wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.problems.append(f"{name} did not exit within 120 s of SIGTERM")
        for name in ("coordinator", "dht"):
            if name in self.procs:
                stop_group(self.procs[name])
                codes[name] = self.procs[name].returncode
        for proc in self.procs.values():
            stop_group(proc, grace_s=1.0)  # anything left in a group we started
        return codes

    def verify(self, report: SoakReport) -> None:
        problems = self.problems
        for name, code in report.exit_codes.items():
            # 0: it left the run cleanly; −SIGTERM: the signal came while it was still starting up (before it
            # installs its handler), which systemd also counts as a clean stop
            if name not in self.expected_dead and name not in ("coordinator", "dht") and code not in (0, -15):
                problems.append(f"{name} exited with {code} on SIGTERM")
        rows = coordinator_rounds(self.root / "state") if self.cfg.mode == "coordinator" else None
        logs = {name: read_round_log(self.root / name) for name in self.procs if name not in ("coordinator", "dht")}
        problems += replica_problems(logs, rows, killed=self.killed)
        exchanges: list[float] = []
        gaps: list[float] = []
        for name, entries in logs.items():
            done = applied(entries)
            report.applied[name] = len(done)
            exchanges += [e["wait_s"] for e in done[1:] if "wait_s" in e]
            gaps += [b["time"] - a["time"] for a, b in zip(done, done[1:]) if b["round"] == a["round"] + 1]
        if exchanges and gaps:
            report.exchange_s_median = round(statistics.median(exchanges), 3)
            report.round_s_median = round(statistics.median(gaps), 3)
        fingerprints = agreed_fingerprints(logs)
        report.committed_rounds = len(rows) if rows is not None else (max(fingerprints) + 1 if fingerprints else 0)
        best = max((n for n in report.applied if (self.root / n / "checkpoint.safetensors").exists()),
                   key=lambda n: report.applied[n], default=None)
        if best is not None:
            report.final_val_loss = final_val_loss(self.root / best, self.run_file)
        report.problems = problems


def run_soak(cfg: SoakConfig, root: Path | None = None, out: Path | None = None) -> SoakReport:
    root = root or Path(tempfile.mkdtemp(prefix=f"lowband-soak-{cfg.mode}-"))
    root.mkdir(parents=True, exist_ok=True)
    report = Soak(cfg, root).run()
    log.info("soak %s: %d rounds committed in %.0f s (round %.2f s, exchange %.2f s median), final val loss %.4f, "
             "%d problems (logs in %s)", cfg.mode, report.committed_rounds, report.wall_s, report.round_s_median,
             report.exchange_s_median, report.final_val_loss, len(report.problems), root)
    for p in report.problems:
        log.error("soak problem: %s", p)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"soak-{cfg.mode}-{cfg.events}ev.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
