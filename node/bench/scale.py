"""``lowband bench scale``: one real coordinator process against N simulated nodes (node/bench/loadgen.py) per result
mode; per setting the round latency, each node's bytes up and down, the coordinator's CPU per round and its memory.

Each setting starts a fresh ``lowband coordinator`` (one torch thread: ``--torch-threads 1`` and
``OMP_NUM_THREADS=1``) on a throwaway state dir, with a run file whose ``[rounds] result`` is the mode
and whose rounds close when every member submitted. Round 0 warms up; the next ``rounds`` are measured. The
coordinator's CPU seconds (``/proc/PID/stat``) are summed over the measured rounds' windows; its RSS is read at start,
after every node joined and at the end (``VmHWM``: the peak since start). Afterwards four more clients join and
download the state at once (``FetchState``) to measure loopback gRPC throughput in this session; transfer time = the
round's bytes through the coordinator / that throughput, overhead = median latency − transfer time (as ``lowband
bench coordinator`` does, with one stream: one stream alone moves less than a round's many).

Sizes: the gpt task's (tiny, small, medium, gpt2) and presets (``SIZE_PRESETS``), e.g. ``10m``: medium with 3 layers,
9,720,320 parameters. ``--dht`` hands over to node/bench/scale_dht.py (the serverless side), which returns rows of
the same schema (node/bench/scale_report.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.bench.loadgen import LoadGenerator, NodeRound, NodeSpec, split_names
from node.bench.procs import child_env, read_coordinator_address, spawn_lowband, stop_group
from node.bench.scale_report import (ScaleRow, cpu_seconds, percentile, round_latency, rss_by_mapping,
                                     status_bytes, status_count, transfer_seconds, write_results)
from node.errors import ConfigError
from node.progress import progress_iter

log = logging.getLogger(__name__)
MODES = ("relay", "aggregate", "compressed")
#: ``--size`` names beyond the gpt task's own: name → (gpt size, GPTConfig overrides)
SIZE_PRESETS: dict[str, tuple[str, dict[str, int]]] = {"10m": ("medium", {"n_layer": 3})}  # 9,720,320 parameters
RUN_ID = "bench-scale"
PROBE_STREAMS = 4  # concurrent state downloads that measure loopback throughput


@dataclass(frozen=True)
class ScaleSettings:
    """What one ``lowband bench scale`` measures: ``size`` (a gpt size or a ``SIZE_PRESETS`` name), ``rounds``
    measured per setting (after one warm-up round), ``load_procs`` load-generator processes, ``recipe`` (its codec
    makes the frames), ``relay_max_nodes`` (relay above it is reported, not run: its traffic grows as N²),
    ``round_timeout_s`` (the bound of every wait in a round), ``heartbeat_s`` of the simulated nodes,
    ``keep_results`` (the run's ``[rounds] keep_results``), ``aggregate_codec`` (aggregate mode's wire precision),
    ``distinct_updates`` (random updates each load-generator process encodes; its nodes take turns with them)."""

    size: str = "10m"
    rounds: int = 3
    load_procs: int = 4
    recipe: str = "sign"
    relay_max_nodes: int = 128
    round_timeout_s: float = 600.0
    start_timeout_s: float = 600.0
    heartbeat_s: float = 5.0
    keep_results: int = 8
    aggregate_codec: str = "identity"
    distinct_updates: int = 2
    tmp_dir: str | None = None  # where the per-setting state dirs are made (None: the system's temp dir)
    coordinator_args: tuple[str, ...] = ()  # more `lowband coordinator` flags (e.g. --upload-read-ahead-kib 1024)


def task_params(size: str) -> dict[str, Any]:
    """The run file's ``[task]`` for ``size``; raises ConfigError for an unknown size."""
    from node.tasks.gpt import GPT_SIZES

    if size in SIZE_PRESETS:
        base, overrides = SIZE_PRESETS[size]
        return {"size": base, **overrides, "batch_size": 8}
    if size in GPT_SIZES:
        return {"size": size, "batch_size": 8}
    raise ConfigError(f"--size {size!r}: expected one of {sorted(GPT_SIZES)} or a preset {sorted(SIZE_PRESETS)}")


def scale_run_file(mode: str, nodes: int, s: ScaleSettings) -> str:
    """A run whose rounds close when all ``nodes`` submitted (the waits are long), that never evaluates, with
    ``[rounds] result = mode``. Raises ConfigError when this tree's run file refuses the mode."""
    from node.runfile import build_run_file

    rounds_policy: dict[str, Any] = {"initial_wait_s": s.round_timeout_s, "max_wait_s": s.round_timeout_s,
                                     "eval_every": 0, "result": mode, "keep_results": s.keep_results}
    if mode == "aggregate":
        rounds_policy["aggregate_codec"] = s.aggregate_codec
    # seats for the throughput probes too: they join after the rounds
    return build_run_file(run_id=RUN_ID, recipe=s.recipe, rounds=100_000, task_params=task_params(s.size),
                          recipe_overrides={"H": 16},
                          membership={"min_nodes": 1, "max_nodes": nodes + PROBE_STREAMS, "heartbeat_s": s.heartbeat_s,
                                      "lease_s": max(60.0, 6 * s.heartbeat_s)},
                          rounds_policy=rounds_policy)


def read_proc(pid: int) -> dict[str, float]:
    """The process's CPU seconds, RSS now, peak RSS and thread count (``/proc/PID/{stat,status}``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    status = Path(f"/proc/{pid}/status").read_text()
    return {"cpu_s": cpu_seconds(stat, os.sysconf("SC_CLK_TCK")), "rss": status_bytes(status, "VmRSS"),
            "hwm": status_bytes(status, "VmHWM"), "threads": status_count(status, "Threads")}


def _identity_fields(run_text: str) -> tuple[dict[str, str], int, int]:
    """(the join identity every simulated node declares, trainable parameters, one frame's exact size with its
    signature) for the run."""
    from node import wire
    from node.compress import make_codec
    from node.runfile import parse_run_file
    from node.tasks import load_task
    from node.train.reference import model_digest

    cfg = parse_run_file(run_text).run
    task = load_task(cfg.task.name, **cfg.task.params)
    named = [(n, p) for n, p in task.build_model(cfg.seed).named_parameters() if p.requires_grad]
    spec = wire.model_spec(named)
    codec = make_codec(cfg.recipe.codec.name, cfg.recipe.codec.params)
    fields = {"config_json": json.dumps(cfg.to_dict()), "config_hash": cfg.config_hash(task.fingerprint),
              "task_fingerprint": task.fingerprint, "model_digest": model_digest(spec)}
    return fields, sum(p.numel() for _, p in named), wire.expected_size(codec, spec, cfg.run_id, "n000", signed=True)


def _probe_throughput(address: str, identity: dict[str, str], streams: int) -> float:
    """Loopback gRPC throughput (bytes/s) of ``streams`` concurrent state downloads (``FetchState``), each by one
    more member: a round's result leaves the coordinator on many streams at once, and one stream alone moves less
    than many (on this box: ~150–200 MB/s alone, ~2× that over 64 streams)."""
    from concurrent.futures import ThreadPoolExecutor

    from node.transport.grpc_client import GrpcTransport, Identity

    clients = []
    try:
        for i in range(streams):
            t = GrpcTransport(address, rpc_timeout_s=60.0)
            clients.append(t)
            t.identity = Identity(f"probe{i}", identity["config_json"], identity["config_hash"],
                                  identity["task_fingerprint"], identity["model_digest"])
            t.join()

        def fetch(t: GrpcTransport) -> int:
            blob = t.fetch_state(timeout_s=600.0)
            if blob is None:
                raise RuntimeError("the throughput probe got no state")
            return len(blob.blob)

        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            total = sum(pool.map(fetch, clients))
        return total / (time.perf_counter() - start)
    finally:
        for t in clients:
            t.leave("probe done")
            t.close()


def summarise(mode: str, n: int, s: ScaleSettings, params: int, payload: int, rounds: list[list[NodeRound]],
              cpu: list[float], procstat: dict[str, int], loopback_Bps: float) -> ScaleRow:
    """A row from the measured rounds: every node's ``NodeRound`` per round and the coordinator's CPU seconds per
    round. Latency and bytes count the nodes whose round committed; the others are counted (and the first's reason
    kept) in ``failed_node_rounds`` and ``failure``. Raises RuntimeError when a round committed for no node."""
    failed = [p for played in rounds for p in played if not p.committed]
    failed += [NodeRound("?", 0.0, 0.0, 0, 0, False, f"{n - len(played)} nodes did not answer")
               for played in rounds if len(played) < n for _ in range(n - len(played))]
    all_rounds, rounds = rounds, [[p for p in played if p.committed] for played in rounds]
    if not all(rounds):
        raise RuntimeError(f"a measured round committed for no node ({failed[0].reason})")
    latencies = [round_latency([p.start for p in played], [p.end for p in played]) for played in rounds]
    served = sum(len(played) for played in rounds)  # (node, round) pairs that committed
    up = sum(p.bytes_up for played in rounds for p in played)
    down = sum(p.bytes_down for played in rounds for p in played)
    median = statistics.median(latencies)
    transfer = transfer_seconds((up + down) / len(rounds), loopback_Bps)
    failure = f"{failed[0].name}: {failed[0].reason}" if failed else ""
    return ScaleRow(plane="coordinator", mode=mode, n=n, size=s.size, params=params, rounds=len(rounds),
                    payload_bytes=payload, bytes_up_per_node_round=up / served,
                    bytes_down_per_node_round=down / served, round_latency_s_median=median,
                    round_latency_s_p90=percentile(latencies, 0.9), cpu_s_per_round=sum(cpu) / len(cpu),
                    peak_rss_bytes=procstat["hwm"], start_rss_bytes=procstat["start_rss"],
                    joined_rss_bytes=procstat["joined_rss"], threads_peak=procstat["threads"],
                    loopback_Bps=loopback_Bps, transfer_s=transfer, overhead_s=median - transfer,
                    failed_node_rounds=len(failed), failure=failure,
                    collect_retries=sum(p.collect_retries for played in all_rounds for p in played))


def measure_setting(mode: str, n: int, s: ScaleSettings, keep: bool = False) -> ScaleRow:
    """One mode at ``n`` simulated nodes (module doc). A setting this tree or this bench cannot run comes back as a
    row whose ``error`` says why; every temporary directory is removed (unless ``keep``), also on error."""
    try:
        run_text = scale_run_file(mode, n, s)
    except ConfigError as exc:
        return ScaleRow("coordinator", mode, n, s.size, error=f"this tree refuses [rounds] result = {mode!r}: {exc}")
    identity, params, payload = _identity_fields(run_text)
    if mode == "relay" and n > s.relay_max_nodes:
        return ScaleRow("coordinator", mode, n, s.size, params, payload_bytes=payload,
                        error=f"relay above --relay-max-nodes {s.relay_max_nodes}: each round would move N(N−1) "
                              f"frames = {n * (n - 1) * payload / 1e9:.1f} GB through the coordinator")
    root = Path(tempfile.mkdtemp(prefix="lowband-bench-scale-", dir=s.tmp_dir))
    proc: subprocess.Popen | None = None
    try:
        (root / "run.toml").write_text(run_text)
        threads = ["--torch-threads", "1"]
        proc = spawn_lowband(["-q", "coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(root / "state"),
                              "--run", str(root / "run.toml"), "--max-rpcs-per-address", str(8 * n + 64),
                              "--max-rpcs-before-join", "64", *threads, *s.coordinator_args],
                             root / "coordinator.log", stdout=subprocess.PIPE, env=child_env(OMP_NUM_THREADS="1"))
        address = read_coordinator_address(proc, s.start_timeout_s)
        stat = {"start_rss": int(read_proc(proc.pid)["rss"])}
        names = [f"n{i:03d}" for i in range(n)]
        specs = [NodeSpec(address, run_text, names=group, seed=i, distinct=s.distinct_updates, **identity)
                 for i, group in enumerate(split_names(names, s.load_procs))]
        log.info("%s N=%d: starting %d simulated nodes in %d processes (each joins with its own key)", mode, n, n,
                 len(specs))
        joining = time.monotonic()
        with LoadGenerator(specs, s.start_timeout_s, s.round_timeout_s) as gen:
            log.info("%s N=%d: every node joined in %.1f s; %d measured rounds after a warm-up round", mode, n,
                     time.monotonic() - joining, s.rounds)
            stat["joined_rss"] = int(read_proc(proc.pid)["rss"])
            measured: list[list[NodeRound]] = []
            cpu: list[float] = []
            for r in range(s.rounds + 1):  # round 0 warms up
                before = read_proc(proc.pid)["cpu_s"]
                played = gen.round(r)
                if r > 0:
                    cpu.append(read_proc(proc.pid)["cpu_s"] - before)
                    measured.append(played)
                    lat = round_latency([p.start for p in played], [p.end for p in played])
                    log.info("%s N=%d round %d/%d: %.3f s, %d/%d committed%s", mode, n, r, s.rounds, lat,
                             sum(p.committed for p in played), n,
                             "".join(f"; {p.name}: {p.reason}" for p in played if not p.committed)[:500])
            after = read_proc(proc.pid)
            stat["hwm"], stat["threads"] = int(after["hwm"]), int(after["threads"])  # before the probe's download
            breakdown = rss_by_mapping(Path(f"/proc/{proc.pid}/smaps").read_text())
        log.info("%s N=%d: measuring loopback throughput (%d concurrent state downloads)", mode, n, PROBE_STREAMS)
        loopback = _probe_throughput(address, identity, PROBE_STREAMS)
        return dataclasses.replace(summarise(mode, n, s, params, payload, measured, cpu, stat, loopback),
                                   rss_breakdown=breakdown)
    except (RuntimeError, TimeoutError, OSError) as exc:
        log.error("%s at N=%d failed: %s (coordinator log: %s)", mode, n, exc, root / "coordinator.log")
        return ScaleRow("coordinator", mode, n, s.size, params, payload_bytes=payload, error=str(exc))
    finally:
        if proc is not None:
            stop_group(proc)
        if keep:
            log.warning("kept %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_scale_bench(nodes: list[int], modes: list[str], s: ScaleSettings, out: Path, keep: bool = False,
                    command: str = "") -> list[ScaleRow]:
    """Every mode at every node count; prints the table and writes ``out`` (node/bench/scale_report.py)."""
    print(f"model: gpt {s.size} = {task_params(s.size)}, {_identity_fields(scale_run_file('relay', 1, s))[1]:,} "
          f"trainable parameters; recipe {s.recipe}", flush=True)
    rows = []
    settings = [(m, n) for m in modes for n in nodes]
    for mode, n in progress_iter(settings, "bench scale", unit="settings"):
        row = measure_setting(mode, n, s, keep)
        if row.error:
            print(f"{mode} N={n}: not measured: {row.error}", flush=True)
        rows.append(row)
    write_report(rows, out, s, command)
    return rows


def write_report(rows: list[ScaleRow], out: Path, s: ScaleSettings, command: str) -> None:
    """Print the table; write JSON, table and plots under ``out``."""
    from node.bench.scale_report import table

    meta = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date":
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit(), "settings": s.__dict__}
    print(table(rows), flush=True)
    path = write_results(rows, out, meta)
    print(f"results: {path}", flush=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
