"""``lowband bench network``: a coordinator run whose nodes sit behind emulated access links.

Where network namespaces can be made (root), the coordinator and every node run in their own namespace
(``node.netem.netns``) behind a ``tc tbf``-shaped veth, and each node reaches the coordinator through its own
``node.netem.link.Link`` relay on the bridge, which adds latency, jitter, loss stalls and outages (this kernel has
no netem). Elsewhere every process is on 127.0.0.1 and the relay shapes the bandwidth as well (logged). After
the measured rounds a joiner starts behind a link of the same profile.

Per configuration (recipe × overlap × profile) it reports, from the nodes' round logs and the links' counters:
- compute utilization per node = time in inner steps / wall time, over ``rounds`` rounds after ``warm`` ones (each
  measured from the end of the round before), the 4 nodes alone;
- bytes each node put on its uplink per round (gRPC + HTTP/2 framing + heartbeats included) vs the codec's
  formula (the exact frame size, ``Worker.payload_bytes``), and what came down;
- round time (median time between a node's consecutive applied rounds);
- join time (the joiner starts after that window): joiner start → the commit of the first round with its
  contribution, vs the goal 1.2 × state bytes / link rate + 5 s, and joiner start → state adopted (ready to
  train: what the link and the state transfer decide; the rest is the wait for a round to start, the first
  round's inner steps, and that round closing).

``cpu_per_node`` gives each node a fixed CPU budget (``node.netem.cpu``: a cgroup quota), so nodes sharing this
box compute as separate machines of that speed would; without it, utilization mixes in CPU contention.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import secrets
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from node.bench.procs import child_env, read_coordinator_address, spawn_lowband, stop_group
from node.roundlog import applied_rounds, coordinator_rounds, read_round_log
from node.runfile import build_run_file, load_run_file
from node.netem import netns as nsmod
from node.netem.cpu import CpuBudget
from node.netem.link import Link
from node.netem.profiles import describe, get_profile
from node.progress import progress_iter

log = logging.getLogger(__name__)


def network_run_file(recipe: str, size: str, batch: int, H: int, nodes: int, overlap: bool, result: str) -> str:
    """The bench's run: endless rounds that start with all ``nodes`` and wait long for everyone, no evaluation."""
    return build_run_file(run_id="bench-network", recipe=recipe, rounds=100_000,
                          task_params={"size": size, "batch_size": batch, "block_size": 128},
                          recipe_overrides={"H": H, "overlap": overlap},
                          membership={"min_nodes": nodes, "heartbeat_s": 2.0, "lease_s": 60.0},
                          rounds_policy={"initial_wait_s": 600.0, "max_wait_s": 600.0, "eval_every": 0,
                                         "result": result})


def _frame_bytes(run_file: Path, name: str) -> tuple[int, int]:
    """(exact frame bytes for ``name``, parameter count) in the run: the codec's formula + the wire envelope."""
    from node import wire
    from node.compress import make_codec
    from node.tasks import load_task

    cfg = load_run_file(run_file).run
    model = load_task(cfg.task.name, **cfg.task.params).build_model(cfg.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    codec = make_codec(cfg.recipe.codec.name, cfg.recipe.codec.params)
    return wire.expected_size(codec, wire.model_spec(named), cfg.run_id, name), sum(p.numel() for _, p in named)


def _commit_times(state_dir: Path) -> dict[int, float]:
    return {row.round: row.committed_at for row in coordinator_rounds(state_dir)}


def run_one(recipe: str, overlap: bool, profile_name: str, *, nodes: int, size: str, H: int, batch: int,
            rounds: int, warm: int, join: bool, root: Path, use_netns: bool = False,
            cpu_per_node: float | None = None, checkpoint_every: int = 1, result: str = "relay") -> dict[str, Any]:
    profile = get_profile(profile_name)
    topo = nsmod.Topology(prefix="lbn") if use_netns else None
    budget = CpuBudget(prefix="lbn") if cpu_per_node else None
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.toml").write_text(network_run_file(recipe, size, batch, H, nodes, overlap, result))
    procs: list[subprocess.Popen] = []
    links: dict[str, Link] = {}
    env = child_env()
    try:
        # with namespaces the kernel shapes bandwidth (tc tbf on each host's veth) and the relay, listening on
        # the bridge, adds only latency, jitter, loss and outages
        relay_profile = dataclasses.replace(profile, up_bps=0.0, down_bps=0.0) if topo else profile
        listen_host = topo.add_host("coord") if topo else "127.0.0.1"
        # namespaces put the coordinator off loopback, on an emulated private network: plaintext on purpose, with the
        # join token a run off loopback needs (docs/security.md)
        private = ["--insecure", "--join-token", secrets.token_hex(16)] if topo else []
        coord = spawn_lowband(["coordinator", "--listen", f"{listen_host}:0", "--state-dir", str(root / "state"),
                               "--run", str(root / "run.toml"), *private], root / "coordinator.log",
                              stdout=subprocess.PIPE,
                              prefix=topo.prefix_cmd("coord") if topo else None, env=env)
        procs.append(coord)
        host, port = read_coordinator_address(coord, 300).rsplit(":", 1)
        names = [f"n{i}" for i in range(nodes)]

        def start(name: str) -> None:
            if topo:
                topo.add_host(name, profile.up_bps, profile.down_bps)
            link = Link((host, int(port)), relay_profile, seed=len(links), name=f"{name}-{profile.name}",
                        listen_host=topo.gateway if topo else "127.0.0.1")
            link.start()
            links[name] = link
            procs.append(spawn_lowband(["node", "--coordinator", link.address, "--workdir", str(root / name),
                                        "--name", name, "--device", "cpu", "--checkpoint-every", str(checkpoint_every),
                                        *private],
                                       root / f"{name}.log", prefix=topo.prefix_cmd(name) if topo else None, env=env))
            if budget is not None and cpu_per_node:
                budget.host(name, cpu_per_node)
                budget.add(name, procs[-1].pid)

        for name in names:
            start(name)
        deadline = time.monotonic() + 3600
        while min(len(applied_rounds(root / n)) for n in names) < warm:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the run did not get under way (logs in {root})")
            time.sleep(0.5)
        # steady state, the 4 nodes alone: counters and round counts over ``rounds`` rounds after the warm ones
        base = {n: (links[n].stats(), len(applied_rounds(root / n))) for n in names}
        while min(len(applied_rounds(root / n)) - base[n][1] for n in names) < rounds:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the run stopped early (logs in {root})")
            time.sleep(0.5)
        snapshot = {n: (links[n].stats(), len(applied_rounds(root / n))) for n in names}
        join_row: dict[str, Any] = {}
        if join:  # then a joiner behind the same profile (after the steady window: a join slows its rounds)
            started = time.time()
            start("joiner")
            while True:
                entries = read_round_log(root / "joiner")
                first = next((e for e in entries if e.get("contributed")), None)
                state = next((e for e in entries if e.get("event") == "state"), None)
                if first is not None:
                    break
                if time.monotonic() > deadline or procs[-1].poll() is not None:
                    raise RuntimeError(f"the joiner did not contribute (logs in {root})")
                time.sleep(0.5)
            state_bytes = state["bytes"] if state else 0
            goal = 1.2 * state_bytes * 8 / profile.down_bps + 5 if profile.down_bps else 5.0
            join_row = {"join_s": first["round"], "state_bytes": state_bytes,  # join_s: see _commit_times below
                        "state_ready_s": round(state["time"] - started, 2) if state else None,
                        "join_goal_s": round(goal, 2), "join_train_s": first.get("train_s")}
    finally:
        for p in reversed(procs):
            stop_group(p)
        for link in links.values():
            link.stop()
        if topo:
            topo.teardown()
        if budget is not None:
            budget.remove()
    if join_row:
        # the joiner's first contribution counts when its round commits (the coordinator's store says when); the
        # joiner's own log line comes when it applies that round, a whole round later with overlap
        join_row["join_s"] = round(_commit_times(root / "state")[join_row["join_s"]] - started, 2)
    frame, params = _frame_bytes(root / "run.toml", "n0")
    per_node = []
    for n in names:
        applied = applied_rounds(root / n)
        (end, end_rounds), (start, start_rounds) = snapshot[n], base[n]
        steady = applied[max(0, start_rounds - 1):end_rounds]  # the last warm round, then the measured ones
        util = sum(e["train_s"] for e in steady[1:]) / (steady[-1]["time"] - steady[0]["time"])
        gaps = [b["time"] - a["time"] for a, b in zip(steady, steady[1:])]
        counted = max(1, end_rounds - start_rounds)
        per_node.append({"node": n, "rounds": len(applied), "utilization": round(util, 4),
                         "round_s": round(statistics.median(gaps), 3),
                         "up_bytes_per_round": (end["bytes_up"] - start["bytes_up"]) / counted,
                         "down_bytes_per_round": (end["bytes_down"] - start["bytes_down"]) / counted,
                         "train_s": round(statistics.median(e["train_s"] for e in steady[1:]), 3)})
    up = statistics.median(r["up_bytes_per_round"] for r in per_node)
    row = {"recipe": recipe, "overlap": overlap, "profile": describe(profile), "nodes": nodes, "size": size,
           "network": "netns + tc tbf + relay" if topo else "loopback + relay",
           "params": params, "H": H, "frame_bytes": frame, "up_bytes_per_round": round(up),
           "up_vs_formula": round(up / frame, 4),
           "down_bytes_per_round": round(statistics.median(r["down_bytes_per_round"] for r in per_node)),
           "utilization_min": min(r["utilization"] for r in per_node),
           "utilization_median": statistics.median(r["utilization"] for r in per_node),
           "round_s": statistics.median(r["round_s"] for r in per_node),
           "train_s": statistics.median(r["train_s"] for r in per_node),
           "upload_s": round(frame * 8 / profile.up_bps, 3) if profile.up_bps else 0.0,
           **join_row, "per_node": per_node, "omp_threads": env["OMP_NUM_THREADS"], "cpu_per_node": cpu_per_node,
           "checkpoint_every": checkpoint_every, "result": result,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    log.info("%s overlap=%s %s: utilization %.1f%% (min %.1f%%), round %.2f s, up %.0f B/round = %.3f× formula%s",
             recipe, overlap, profile.name, 100 * row["utilization_median"], 100 * row["utilization_min"],
             row["round_s"], up, row["up_vs_formula"],
             f", join {join_row['join_s']} s (goal {join_row['join_goal_s']} s)" if join_row else "")
    return row


def run_network_bench(recipes: list[str], profiles: list[str], overlaps: list[bool], *, nodes: int = 4,
                      size: str = "medium", H: int = 8, batch: int = 1, rounds: int = 6, warm: int = 2,
                      join: bool = True, out: Path | None = None, netns: bool | None = None,
                      cpu_per_node: float | None = None, checkpoint_every: int = 1,
                      result: str = "relay") -> list[dict[str, Any]]:
    """``netns``: None = use namespaces where possible (else say so and use loopback), True = require them."""
    rows = []
    ok, why = nsmod.available()
    if netns and not ok:
        raise RuntimeError(f"network namespaces are not available here: {why}")
    use_netns = ok if netns is None else netns
    if not use_netns:
        log.warning("network namespaces %s: every process on loopback, links emulated by the relay alone",
                    f"unavailable ({why})" if not ok else "not requested")
    base = Path(tempfile.mkdtemp(prefix="lowband-bench-network-"))
    for profile, recipe, overlap in progress_iter([(p, r, o) for p in profiles for r in recipes for o in overlaps],
                                                  "bench network", unit="settings"):
        rows.append(run_one(recipe, overlap, profile, nodes=nodes, size=size, H=H, batch=batch,
                            rounds=rounds, warm=warm, join=join, use_netns=use_netns,
                            cpu_per_node=cpu_per_node, checkpoint_every=checkpoint_every, result=result,
                            root=base / f"{recipe}-{profile}-{'overlap' if overlap else 'sync'}"))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "network.json").write_text(json.dumps(rows, indent=2))
    lines = ["| profile | recipe | overlap | frame B | up B/round (× formula) | round s | train s | "
             "utilization median (min) | join s (goal) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        join_cell = f"{r['join_s']} ({r['join_goal_s']})" if "join_s" in r else "–"
        lines.append(f"| {r['profile'].split(':')[0]} | {r['recipe']} | {r['overlap']} | {r['frame_bytes']:,} | "
                     f"{r['up_bytes_per_round']:,} ({r['up_vs_formula']:.3f}×) | {r['round_s']:.2f} | "
                     f"{r['train_s']:.2f} | {100 * r['utilization_median']:.1f}% ({100 * r['utilization_min']:.1f}%) "
                     f"| {join_cell} |")
    print("\n".join(lines))
    return rows
