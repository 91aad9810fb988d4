"""``lowband demo``: a coordinator and N nodes as separate processes on 127.0.0.1, end to end.

Shows one line per committed round, cleans up every process it started (each runs in its own process
group), then prints a summary — final validation loss, bytes per node against what dense fp32
``diloco`` would have sent for the same rounds — and writes a loss-vs-bytes plot.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

RUN_TEMPLATE = """\
[run]
id = "demo-{recipe}"
task = "gpt"
recipe = "{recipe}"
rounds = {rounds}
seed = 0

[task]
size = "tiny"
batch_size = 8

[recipe]
H = {H}
"inner.lr" = 2e-3
{tuning}
[membership]
min_nodes = {min_nodes}
max_nodes = 16
heartbeat_s = 1.0
lease_s = 6.0

[rounds]
initial_wait_s = 60.0
min_wait_s = 2.0
max_wait_s = 60.0
eval_every = 1
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


#: Per-recipe settings for a short demo run: the sign-momentum global lr γ = 1 of the spec moves each
#: coordinate by only η_t per round, which needs hundreds of rounds; γ = 4 was best in the quick
#: quality benchmark (BENCHMARKS.md). The recipes themselves keep the spec's defaults.
DEMO_TUNING: dict[str, dict[str, float]] = {"sign": {"outer.lr": 4.0}, "dsm": {"outer.lr": 4.0}}


def _spawn(args: list[str], log_path: Path, stdout: int | None = None,
           prefix: list[str] | None = None) -> subprocess.Popen:
    """``lowband ARGS`` in its own session; ``prefix`` runs it through e.g. ``ip netns exec NS``."""
    out = open(log_path, "ab")
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "node.cli", *args], stdout=stdout or out,
                            stderr=out,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _read_address(proc: subprocess.Popen, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with {proc.returncode} before listening")
        chunk = proc.stdout.read() or b""
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if "listening on" in line:
                return line.rsplit(" ", 1)[-1].strip()
        time.sleep(0.1)
    raise TimeoutError("coordinator did not print its address in time")


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


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
    from node.runfile import parse_run_file
    from node import wire
    from node.compress import make_codec
    from node.roundlog import coordinator_rounds
    from node.status import fetch_status

    root = Path(workdir or tempfile.mkdtemp(prefix="lowband-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    tuning = "".join(f'"{k}" = {v}\n' for k, v in DEMO_TUNING.get(recipe, {}).items())
    run_text = RUN_TEMPLATE.format(recipe=recipe, rounds=rounds, H=H, min_nodes=max(1, nodes - 1), tuning=tuning)
    (root / "run.toml").write_text(run_text)
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    # The children run in their own process groups, so a SIGTERM to the demo would not reach them: turn it
    # into KeyboardInterrupt so that the ``finally`` below stops every one of them.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    print(f"lowband demo: coordinator + {nodes} nodes, recipe {recipe}, {rounds} rounds of H={H}; files in {root}",
          flush=True)
    try:
        coord = _spawn(["coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(root / "state"),
                        "--run", str(root / "run.toml")], root / "coordinator.log", stdout=subprocess.PIPE)
        procs.append(coord)
        address = _read_address(coord, 120)
        print(f"coordinator listening on {address}", flush=True)
        nodes_procs = [_spawn(["node", "--coordinator", address, "--workdir", str(root / f"node{i}"),
                               "--name", f"node{i}", "--device", "cpu"], root / f"node{i}.log") for i in range(nodes)]
        procs.extend(nodes_procs)
        shown = 0
        while any(p.poll() is None for p in nodes_procs):
            if time.monotonic() - started > timeout_s:
                print("demo: timed out", flush=True)
                return 1
            time.sleep(1.0)
            try:
                status = fetch_status(address, timeout_s=5)
            except Exception:
                continue
            for r in status.recent_rounds:
                if r.round >= shown:
                    val = "" if math.isnan(r.val_loss) else f" val_loss={r.val_loss:.4f}"
                    print(f"round {r.round:>3}/{rounds}: members={len(r.members)} train_loss={r.mean_loss:.4f}{val} "
                          f"bytes_in={r.bytes_in:,} ({r.duration_s:.2f} s to close)", flush=True)
                    shown = r.round + 1
        failed = [i for i, p in enumerate(nodes_procs) if p.returncode != 0]
        stop_group(coord, grace_s=120.0)  # it finishes the last evaluation before it exits
    finally:
        if main:  # a second SIGTERM must not cut the cleanup short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in reversed(procs):
            stop_group(p)
        if main:
            signal.signal(signal.SIGTERM, previous)
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
    plot = _plot(rows, own, root / "loss_vs_bytes.png", recipe)
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


def _plot(rows: list, payload: int, path: Path, recipe: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [(r.round + 1) * payload for r in rows if not math.isnan(r.val_loss)]
    ys = [r.val_loss for r in rows if not math.isnan(r.val_loss)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, marker="o", label=recipe)
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per node (log)")
    ax.set_ylabel("validation loss of the coordinator's reference")
    ax.set_title("lowband demo: loss vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
