"""The rows of ``lowband bench scale`` (coordinator and serverless alike), the arithmetic that makes them, and the
writer of their JSON, table and plots.

One row is one setting (a result mode or the DHT, at one node count) measured over several rounds. ``ScaleRow`` is
the one schema both sides fill: node/bench/scale.py for the coordinator, node/bench/scale_dht.py for serverless
rounds, whose rows may come as plain dicts with the serverless names (``peers``, ``bytes_up_per_peer_round``, ...,
``round_latency_s: {"median", "p90"}``): ``ScaleRow.from_mapping`` reads both spellings.

Units: bytes, seconds, CPU seconds (user + system of the serving process), bytes of resident memory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

#: serverless spellings (the DHT side's dicts) → ScaleRow fields
ALIASES = {"peers": "n", "nodes": "n", "bytes_up_per_peer_round": "bytes_up_per_node_round",
           "bytes_down_per_peer_round": "bytes_down_per_node_round"}
JSON_NAME = "scale.json"


@dataclass(frozen=True)
class ScaleRow:
    """One measured setting. ``plane``: "coordinator" or "dht"; ``mode``: the run's result mode (relay, aggregate,
    compressed) or the serverless reduce ("dht"); ``n``: simulated nodes (peers); ``payload_bytes``: one node's
    upload (one sign frame) for reference; ``bytes_*_per_node_round``: mean over nodes and measured rounds, counted
    at the client (frames sent; result bytes received); latencies: first submit → last member holds its result;
    ``cpu_s_per_round``: the serving process's CPU seconds per round (the coordinator; serverless: per peer);
    ``transfer_s``: the round's bytes through the coordinator at the loopback throughput measured in-session;
    ``overhead_s`` = median latency − ``transfer_s``; latencies and bytes count only the nodes whose result
    committed (``failed_node_rounds`` counts the others); ``error``: why the setting was not measured (empty when it
    was)."""

    plane: str
    mode: str
    n: int
    size: str = ""
    params: int = 0
    rounds: int = 0
    payload_bytes: int = 0
    bytes_up_per_node_round: float = 0.0
    bytes_down_per_node_round: float = 0.0
    round_latency_s_median: float = math.nan
    round_latency_s_p90: float = math.nan
    cpu_s_per_round: float = math.nan
    peak_rss_bytes: int = 0
    start_rss_bytes: int = 0
    joined_rss_bytes: int = 0  # after every node joined, before the first round
    threads_peak: int = 0  # the serving process's threads at the end of the rounds (RSS diagnosis)
    failed_node_rounds: int = 0  # (node, round) pairs without a committed result; ``failure``: the first one's why
    failure: str = ""
    collect_retries: int = 0  # Collect calls cut (e.g. by the coordinator's stream bounds) and asked again, in all
    #: the serving process's resident memory by kind of mapping at the end of the rounds (``rss_by_mapping``)
    rss_breakdown: dict[str, int] = field(default_factory=dict)
    loopback_Bps: float = math.nan
    transfer_s: float = math.nan
    overhead_s: float = math.nan
    error: str = ""

    @property
    def measured(self) -> bool:
        return not self.error

    @property
    def down_per_payload(self) -> float:
        """Each node's downlink per round in units of one payload (the issue's target: ≤ 1.05)."""
        return self.bytes_down_per_node_round / self.payload_bytes if self.payload_bytes else math.nan

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "ScaleRow":
        """A row from its JSON form or from the serverless side's dict; raises ValueError naming an unknown key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for key, value in d.items():
            if key == "round_latency_s" and isinstance(value, Mapping):
                out["round_latency_s_median"] = float(value["median"])
                out["round_latency_s_p90"] = float(value["p90"])
                continue
            name = ALIASES.get(key, key)
            if name not in fields:
                raise ValueError(f"scale row: unknown field {key!r} (known: {sorted(fields | set(ALIASES))})")
            out[name] = value
        if "peers" in d:
            out.setdefault("plane", "dht")
            out.setdefault("mode", "dht")
        return cls(**out)


# -- arithmetic ---------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 ≤ q ≤ 1) by linear interpolation between order statistics (numpy's default);
    NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def round_latency(starts: Iterable[float], ends: Iterable[float]) -> float:
    """One round's latency: the first submit's start to the last member's result, on one monotonic clock."""
    return max(ends) - min(starts)


def transfer_seconds(bytes_through: float, loopback_Bps: float) -> float:
    """Time the round's bytes take at the measured loopback throughput (bytes per second)."""
    return bytes_through / loopback_Bps


def cpu_seconds(stat_text: str, ticks_per_s: int) -> float:
    """User + system CPU seconds from the text of ``/proc/PID/stat`` (fields 14 and 15, in clock ticks)."""
    rest = stat_text.rpartition(")")[2].split()  # after "pid (comm)": field 3 is rest[0]
    return (int(rest[11]) + int(rest[12])) / ticks_per_s


def status_bytes(status_text: str, key: str) -> int:
    """A ``kB`` line of ``/proc/PID/status`` (VmHWM, VmRSS) in bytes; raises KeyError when absent."""
    for line in status_text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    raise KeyError(key)


STACK_KIB = 8192  # a thread's stack mapping (the default 8 MiB)
ARENA_MAX_KIB = 65536  # glibc's per-thread malloc arenas are heaps of at most 64 MiB


def rss_by_mapping(smaps_text: str) -> dict[str, int]:
    """Resident bytes of ``/proc/PID/smaps`` by kind of mapping: ``heap`` (the brk heap: the main malloc arena),
    ``thread_stacks`` (anonymous mappings of exactly 8 MiB), ``malloc_arenas`` (other anonymous mappings up to
    64 MiB: glibc's per-thread arenas, and blocks mmapped alone), ``large_anonymous`` (anonymous mappings above
    64 MiB: large blocks such as tensors and serialised states), ``files`` (mapped files: code, libraries)."""
    out = {"heap": 0, "thread_stacks": 0, "malloc_arenas": 0, "large_anonymous": 0, "files": 0}
    name, size_kib = "", 0
    for line in smaps_text.splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line: range perms offset dev inode [path]
            name = head[5] if len(head) > 5 else ""
        elif head[0] == "Size:":
            size_kib = int(head[1])
        elif head[0] == "Rss:":
            rss = int(head[1]) * 1024
            if name == "[heap]":
                out["heap"] += rss
            elif name.startswith("/"):
                out["files"] += rss
            elif name:
                continue  # [stack], [vdso], ...: small
            elif size_kib == STACK_KIB:
                out["thread_stacks"] += rss
            elif size_kib <= ARENA_MAX_KIB:
                out["malloc_arenas"] += rss
            else:
                out["large_anonymous"] += rss
    return out


def status_count(status_text: str, key: str) -> int:
    """A count line of ``/proc/PID/status`` (Threads)."""
    for line in status_text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


# -- output ---------------------------------------------------------------------------------------------------
def table(rows: Sequence[ScaleRow]) -> str:
    """A markdown table of the rows (unmeasured ones say why)."""
    lines = ["| plane | mode | N | params | payload B | up B/node/round | down B/node/round | down/payload | "
             "median s | p90 s | transfer s | overhead s | CPU s/round | RSS start MiB | RSS joined MiB | RSS peak MiB | "
             "threads | failed node-rounds | collect retries |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.measured:
            lines.append(f"| {r.plane} | {r.mode} | {r.n} | {r.params:,} | | | | | not measured: {r.error} "
                         "| | | | | | | | | | |")
            continue
        lines.append(f"| {r.plane} | {r.mode} | {r.n} | {r.params:,} | {r.payload_bytes:,} | "
                     f"{r.bytes_up_per_node_round:,.0f} | {r.bytes_down_per_node_round:,.0f} | {r.down_per_payload:.2f} | "
                     f"{r.round_latency_s_median:.3f} | {r.round_latency_s_p90:.3f} | {r.transfer_s:.3f} | "
                     f"{r.overhead_s:.3f} | {r.cpu_s_per_round:.3f} | {r.start_rss_bytes / 2**20:.0f} | "
                     f"{r.joined_rss_bytes / 2**20:.0f} | "
                     f"{r.peak_rss_bytes / 2**20:.0f} | {r.threads_peak} | {r.failed_node_rounds} | "
                     f"{r.collect_retries} |")
    return "\n".join(lines)


def write_results(rows: Sequence[ScaleRow], out: Path, meta: Mapping[str, Any], name: str = JSON_NAME) -> Path:
    """``out/NAME``: the rows merged with those already there (a setting measured again replaces its old row) and
    ``meta`` appended to the file's list of runs (command, machine, commit, date); ``out/scale.md`` and the plots of
    every row there. Returns the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    merged: dict[tuple[str, str, int], ScaleRow] = {}
    runs: list[Any] = []
    if path.exists():
        old_doc = json.loads(path.read_text())
        runs = list(old_doc.get("runs", []))
        for d in old_doc.get("rows", []):
            old = ScaleRow.from_mapping(d)
            merged[(old.plane, old.mode, old.n)] = old
    for r in rows:
        merged[(r.plane, r.mode, r.n)] = r
    ordered = sorted(merged.values(), key=lambda r: (r.plane, r.mode, r.n))
    path.write_text(json.dumps({"runs": [*runs, dict(meta)], "rows": [r.to_dict() for r in ordered]}, indent=2) + "\n")
    (out / "scale.md").write_text(table(ordered) + "\n")
    plot(ordered, out)
    return path


PLOTS = (("latency", "round latency, median (s)", lambda r: r.round_latency_s_median),
         ("bytes_down", "bytes down per node per round", lambda r: r.bytes_down_per_node_round),
         ("rss", "serving process peak RSS (MiB)", lambda r: r.peak_rss_bytes / 2**20),
         ("cpu", "serving process CPU s per round", lambda r: r.cpu_s_per_round))


def plot(rows: Sequence[ScaleRow], out: Path) -> list[Path]:
    """One PNG per quantity against N (log x), one curve per (plane, mode); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[ScaleRow]] = {}
    for r in rows:
        if r.measured:
            curves.setdefault(f"{r.plane} {r.mode}", []).append(r)
    written = []
    for stem, label, value in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for curve, members in sorted(curves.items()):
            members.sort(key=lambda r: r.n)
            ax.plot([r.n for r in members], [value(r) for r in members], marker="o", label=curve)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("simulated nodes N (log)")
        ax.set_ylabel(label)
        if curves:
            ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out / f"{stem}_vs_n.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
