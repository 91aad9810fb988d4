"""``lowband demo``: a coordinator and N nodes as separate processes on 127.0.0.1, end to end.

Shows one line per committed round, cleans up every process it started (each runs in its own process
group), then prints a summary — final validation loss, bytes per node against what dense fp32
``diloco`` would have sent for the same rounds — and writes a loss-vs-bytes plot.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from node.bench.procs import read_coordinator_address, spawn_lowband, stop_group
from node.roundlog import RoundRow, coordinator_rounds

log = logging.getLogger(__name__)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def demo_run_file(recipe: str, rounds: int, H: int, nodes: int) -> str:
    """The demo's run: the tiny model, every round evaluated, started once all but one node joined."""
    from node.runfile import build_run_file

    # the inner peak lr of the quality profiles, at which the recipes' outer defaults were tuned (BENCHMARKS.md)
    overrides: dict[str, float | int] = {"H": H, "inner.lr": 2e-3}
    return build_run_file(run_id=f"demo-{recipe}", recipe=recipe, rounds=rounds,
                          task_params={"size": "tiny", "batch_size": 8}, recipe_overrides=overrides,
                          membership={"min_nodes": max(1, nodes - 1), "max_nodes": 16, "heartbeat_s": 1.0,
                                      "lease_s": 6.0},
                          rounds_policy={"initial_wait_s": 60.0, "min_wait_s": 2.0, "max_wait_s": 60.0,
                                         "eval_every": 1})


def check_demo(recipe: str, nodes: int, rounds: int, H: int) -> None:
    """Refuse (ConfigError, one line) what the demo's coordinator would refuse, before any process starts."""
    from node.errors import ConfigError

    for name, value in (("--nodes", nodes), ("--rounds", rounds), ("--H", H)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    demo_run_file(recipe, rounds, H, nodes)  # parsed back: a recipe the coordinator cannot serve is refused here


def eta(started: float, done: int, total: int, now: float) -> str:
    """The time left at the pace so far, e.g. ``1m05s`` (``?`` before the first round)."""
    if done <= 0 or done >= total:
        return "?" if done <= 0 else "0s"
    left = int((now - started) / done * (total - done))
    return f"{left // 60}m{left % 60:02d}s" if left >= 60 else f"{left}s"


def rounds_to_show(rows: Sequence[RoundRow], shown: int, ended: bool) -> list[RoundRow]:
    """The committed rounds from round ``shown`` on whose line is final, in order. A round's line waits for its
    validation loss until it is known, or known never to come: a later round has one (the coordinator's evaluator
    scores rounds in order and skips to the newest when it falls behind), or the run ended."""
    last_scored = max((r.round for r in rows if not math.isnan(r.val_loss)), default=-1)
    out: list[RoundRow] = []
    for row in rows:
        if row.round < shown:
            continue
        if row.round != shown + len(out) or not (ended or row.round <= last_scored):
            break
        out.append(row)
    return out


def round_line(row: RoundRow, rounds: int, left: str = "") -> str:
    val = "" if math.isnan(row.val_loss) else f" val_loss={row.val_loss:.4f}"
    return (f"round {row.round:>3}/{rounds}: members={len(row.members)} train_loss={row.mean_loss:.4f}{val} "
            f"bytes_in={row.bytes_in:,} ({row.duration_s:.2f} s to close)" + (f" eta {left}" if left else ""))


def _node_totals(workdir: Path) -> tuple[int, int]:
    sent = received = 0
    path = workdir / "rounds.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            sent += entry.get("bytes_out", 0)
            received += entry.get("bytes_in", 0) + entry.get("bytes", 0)
    return sent, received


def run_demo(recipe: str = "sign", nodes: int = 3, rounds: int = 12, H: int = 16, workdir: str | None = None,
             timeout_s: float = 900.0) -> int:
    from node import wire
    from node.compress import make_codec
    from node.runfile import parse_run_file

    root = Path(workdir or tempfile.mkdtemp(prefix="lowband-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    run_text = demo_run_file(recipe, rounds, H, nodes)
    (root / "run.toml").write_text(run_text)
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    shown = 0

    def show(ended: bool) -> None:
        nonlocal shown
        for row in rounds_to_show(coordinator_rounds(root / "state"), shown, ended):
            shown = row.round + 1
            print(round_line(row, rounds, eta(started, shown, rounds, time.monotonic())), flush=True)

    # The children run in their own process groups, so a SIGTERM to the demo would not reach them: turn it
    # into KeyboardInterrupt so that the ``finally`` below stops every one of them.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    print(f"lowband demo: coordinator + {nodes} nodes, recipe {recipe}, {rounds} rounds of H={H}; files in {root}",
          flush=True)
    try:
        coord = spawn_lowband(["coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(root / "state"),
                               "--run", str(root / "run.toml")], root / "coordinator.log", stdout=subprocess.PIPE)
        procs.append(coord)
        address = read_coordinator_address(coord, 120)
        print(f"coordinator listening on {address}", flush=True)
        nodes_procs = [spawn_lowband(["node", "--coordinator", address, "--workdir", str(root / f"node{i}"),
                                      "--name", f"node{i}", "--device", "cpu"], root / f"node{i}.log")
                       for i in range(nodes)]
        procs.extend(nodes_procs)
        while live := [p for p in nodes_procs if p.poll() is None]:
            if time.monotonic() - started > timeout_s:
                print("demo: timed out", flush=True)
                return 1
            show(ended=False)
            try:  # the next look at the round log in a second, or at once when a node exits
                live[0].wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        failed = [i for i, p in enumerate(nodes_procs) if p.returncode != 0]
        stop_group(coord, grace_s=120.0)  # it finishes the last evaluation before it exits
    finally:
        if main:  # a second SIGTERM must not cut the cleanup short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in reversed(procs):
            stop_group(p)
        if main:
            signal.signal(signal.SIGTERM, previous)
    show(ended=True)
    rows = coordinator_rounds(root / "state")
    cfg = parse_run_file(run_text).run
    from node.tasks import load_task

    task = load_task(cfg.task.name, **cfg.task.params)
    model = task.build_model(cfg.seed)
    spec = wire.model_spec([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    own = wire.expected_size(make_codec(cfg.recipe.codec.name, cfg.recipe.codec.params), spec, cfg.run_id, "node0")
    dense = wire.expected_size(make_codec("identity"), spec, cfg.run_id, "node0")
    totals = [_node_totals(root / f"node{i}") for i in range(nodes)]
    vals = [r.val_loss for r in rows if not math.isnan(r.val_loss)]
    per_node_sent = max(s for s, _ in totals) if totals else 0
    plot = _plot(rows, own, dense, root / "loss_vs_bytes.png", recipe)
    print(f"\nsummary: {len(rows)} rounds committed in {time.monotonic() - started:.0f} s; final val loss "
          f"{vals[-1] if vals else float('nan'):.4f} (from {vals[0] if vals else float('nan'):.4f})")
    for i, (s, r) in enumerate(totals):
        print(f"  node{i}: sent {s:,} B, received {r:,} B")
    print(f"  payload per round: {own:,} B ({recipe}) vs {dense:,} B (diloco fp32) → {dense / own:.1f}× fewer bytes; "
          f"diloco would have sent {dense * len(rows):,} B per node for these rounds (this run: {per_node_sent:,} B)")
    print(f"  plot: {plot}\n  logs: {root}")
    if failed:
        print(f"demo: nodes {failed} exited with an error; see their logs", flush=True)
        return 1
    return 0


def _plot(rows: list, payload: int, dense: int, path: Path, recipe: str) -> Path:
    """Validation loss against bytes sent per node; the same rounds are drawn again at the bytes dense fp32
    ``diloco`` frames would have taken, so the horizontal gap is the saving the summary prints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [(r.round + 1) * payload for r in rows if not math.isnan(r.val_loss)]
    ys = [r.val_loss for r in rows if not math.isnan(r.val_loss)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, marker="o", label=f"{recipe} ({payload:,} B per round)")
    if dense != payload:
        ax.plot([x // payload * dense for x in xs], ys, linestyle="--", color="grey",
                label=f"the same rounds at dense fp32 diloco bytes ({dense:,} B per round, {dense / payload:.1f}×)")
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per node (log)")
    ax.set_ylabel("validation loss of the coordinator's reference")
    ax.set_title("lowband demo: loss vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
