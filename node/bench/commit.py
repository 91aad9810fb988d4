"""``lowband bench commit``: the coordinator's commit path and its memory for a large model.

One coordinator core in this process (coordinator/core.py, no network) serves a run of the ``gpt`` task with model
overrides (by default 24 layers of width 1024: ~300M parameters) and the ``sign`` recipe; a few members join and
submit precomputed, signed sign frames. For each round it reports the parts of the commit path the core timed
(``Rounds.commit_timing``): the reduce of the frames, making the round durable (its write-ahead record with the
frames, fsynced, then the SQLite row: the commit point), freezing a snapshot still being written, the in-place outer
step — and, after the commit path, the state's fingerprint. One round commits while a snapshot is being written
(``snapshot_every`` = 2): it shows the cost a snapshot moves onto a commit that overlaps it.

Memory: the peak resident set (VmHWM, /proc/self/status) is reset after the set-up (building the model and the
frames) by writing 5 to /proc/self/clear_refs, and read after the rounds: the peak of the rounds and the snapshot,
compared to the state's size (θ_ref, buffers and the outer optimizer's state). The state dir is a temporary folder,
removed at the end.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from node import wire
from node.identity import NodeKey
from node.runfile import build_run_file, parse_run_file

log = logging.getLogger(__name__)
CHUNK = 1 << 20  # bytes per upload chunk, as the gRPC client sends them


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def run_commit_bench(n_layer: int = 24, n_embd: int = 1024, n_head: int = 16, members: int = 3, rounds: int = 4,
                     out: Path | None = None, result: str = "relay") -> dict[str, Any]:
    """Build the run, commit ``rounds`` rounds of ``members`` sign frames, report the commit path's parts (seconds)
    and the peak RSS relative to the state (bytes). ``result``: the run's ``[rounds] result`` (with an aggregate the
    frames are reduced as they are submitted: ``submit_s`` per row is that time, off the commit path). Raises
    ConfigError for a bad model shape."""
    from coordinator.core import PROTOCOL_VERSION, Chunk, CoordinatorCore
    from coordinator.store import Store
    from node.transport.grpc_auth import join_message

    from coordinator.startup import return_freed_memory_to_the_system

    torch.set_num_threads(1)  # the coordinator's torch work on one thread (2 busy cores: more threads were slower)
    return_freed_memory_to_the_system()  # as `lowband coordinator` does
    root = Path(tempfile.mkdtemp(prefix="lowband-bench-commit-"))
    try:
        text = build_run_file(run_id="bench-commit", recipe="sign", rounds=100_000,
                              task_params={"size": "gpt2", "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                                           "batch_size": 1},
                              membership={"min_nodes": members, "max_nodes": members, "heartbeat_s": 60.0,
                                          "lease_s": 3600.0},
                              rounds_policy={"initial_wait_s": 3600.0, "max_wait_s": 3600.0, "eval_every": 0,
                                             "snapshot_every": 2, "result": result})
        cfg = parse_run_file(text)
        clock = [1000.0]
        t0 = time.perf_counter()
        store = Store(root / "state")
        core = CoordinatorCore(cfg, store, clock=lambda: clock[0], wall=time.time)
        ref = core.reference
        params = sum(t.numel() for t in ref.tensors)
        info = core.run_info(PROTOCOL_VERSION, cfg.membership.join_token)
        names = [f"m{i}" for i in range(members)]
        keys = {n: NodeKey.generate() for n in names}
        ids = {}
        for i, n in enumerate(names):
            ts = int(time.time() * 1000) + i
            ids[n] = core.join(n, PROTOCOL_VERSION, info["config_json"], info["config_hash"], info["task_fingerprint"],
                               info["model_digest"], ("device=cpu",), "", public_key=keys[n].public,
                               signature=keys[n].sign(join_message(cfg.run.run_id, n, keys[n].public, ts)),
                               timestamp_ms=ts)["node_id"]
        gen = torch.Generator().manual_seed(1)

        def frame(name: str, r: int) -> bytes:
            enc = {s.name: ref.codec.encode(torch.randn(s.shape, generator=gen) * 1e-3) for s in ref.spec}
            return wire.pack(cfg.run.run_id, r, name, ref.codec, ref.spec, enc, key=keys[name])

        frames = {n: frame(n, 0) for n in names}
        setup_s = time.perf_counter() - t0
        rss_before = _status_kib("VmRSS") * 1024
        reset = _reset_peak()
        rows = []
        for r in range(rounds):
            if r:
                frames = {n: wire.pack(cfg.run.run_id, r, n, ref.codec, ref.spec,
                                       wire.unpack(f, ref.codec, ref.spec, cfg.run.run_id, r - 1).tensors,
                                       key=keys[n]) for n, f in frames.items()}
            running = core.snapshots.current if core.snapshots.busy else None
            submit_t0 = time.perf_counter()
            for n in names:
                f = frames[n]
                core.submit(Chunk(ids[n], r, at, len(f), f[at:at + CHUNK], 2.0) for at in range(0, len(f), CHUNK))
            # the submissions' own time: the last one's call ran the commit, timed apart (its wall-clock parts)
            commit_wall = sum(v for k, v in core.commit_timing.items() if k != "cpu_s")
            submit_s = time.perf_counter() - submit_t0 - commit_wall
            assert core.reference.committed_rounds == r + 1, "the round did not commit"
            t = dict(core.commit_timing)
            t["commit_path_s"] = t["reduce_s"] + t["durable_s"] + t["freeze_s"] + t["step_s"]
            froze = list(running.frozen) if running is not None else None  # (tensors cloned, written) by the commit
            rows.append({"round": r, "snapshot_running": running is not None, "snapshot_froze": froze,
                         "submit_s": round(submit_s, 3),
                         **{k: round(v, 3) for k, v in t.items()},
                         "frame_bytes": sum(len(f) for f in frames.values())})
            log.info("round %d: %s", r, rows[-1])
            clock[0] += 1.0
            for n in names:
                core.heartbeat(ids[n])
        snap_t0 = time.perf_counter()
        core.snapshots.wait()
        snapshot_wait_s = time.perf_counter() - snap_t0
        peak = _status_kib("VmHWM") * 1024
        # the state as a snapshot holds it, once the outer optimizer's state exists (it is created at the first step)
        _, state_tensors = core.reference.state(copy=False, fingerprint="0" * 16)
        state_bytes = sum(t.numel() * t.element_size() for t in state_tensors.values())
        del state_tensors
        result = {
            "bench": "commit", "params": params, "state_bytes": state_bytes, "members": members, "rounds": rounds,
            "result": result,
            "model": {"task": "gpt", "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head},
            "setup_s": round(setup_s, 1), "rss_before_rounds_bytes": rss_before, "load_average": os.getloadavg(),
            "peak_rss_bytes": peak, "peak_reset": reset,
            "peak_over_state": round(peak / state_bytes, 3), "snapshot_wait_after_rounds_s": round(snapshot_wait_s, 2),
            "rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch_threads": 1,
        }
        core.close()
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text_out + "\n")
    return result
