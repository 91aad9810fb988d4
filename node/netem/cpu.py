"""A fixed CPU budget per emulated host (a cgroup CPU quota), so several nodes on one box compute as if each had
its own machine of that speed.

Without it, nodes that share a few cores steal time from each other: a node that waits on the network frees CPU
that the others then use, so one node's idle time is another's speed-up and per-node compute utilization means
little. With a quota (CFS bandwidth control: ``cores`` × the period per period) a node computes at the same rate
whatever the others do, and time it spends waiting is lost to it, as on a real separate machine.

cgroup v2 (``cpu.max``) where the unified hierarchy has the cpu controller, else cgroup v1 (``cpu.cfs_quota_us``).
Needs root; ``available()`` says why not otherwise.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
PERIOD_US = 100_000
_V2 = Path("/sys/fs/cgroup")
_V1 = Path("/sys/fs/cgroup/cpu")


def _v2_ready() -> bool:
    controllers = _V2 / "cgroup.controllers"
    return controllers.exists() and "cpu" in controllers.read_text().split()


def available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "CPU quotas need root (cgroups)"
    if _v2_ready() or (_V1 / "cpu.cfs_quota_us").exists():
        return True, ""
    return False, "no cgroup cpu controller is mounted"


class CpuBudget:
    """One cgroup per host, ``cores`` CPUs' worth of time each; ``add(pid)`` moves a process (its later children
    follow). ``remove()`` moves stragglers back to the root group and deletes the groups."""

    def __init__(self, prefix: str = "lowband") -> None:
        ok, why = available()
        if not ok:
            raise RuntimeError(why)
        self.base = _V2 if _v2_ready() else _V1
        self.prefix = prefix
        self.groups: dict[str, Path] = {}

    def host(self, name: str, cores: float) -> Path:
        if cores <= 0:
            raise ValueError(f"a CPU budget is a positive number of cores, got {cores}")
        group = self.base / f"{self.prefix}-{name}"
        group.mkdir(exist_ok=True)
        quota = max(1000, int(cores * PERIOD_US))
        if self.base is _V2:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        self.groups[name] = group
        return group

    def add(self, name: str, pid: int) -> None:
        (self.groups[name] / "cgroup.procs").write_text(str(pid))

    def throttled_s(self, name: str) -> float:
        """Seconds the host's processes were held back by the quota so far."""
        stat = dict(line.split() for line in (self.groups[name] / "cpu.stat").read_text().splitlines() if " " in line)
        if "throttled_usec" in stat:
            return int(stat["throttled_usec"]) / 1e6
        return int(stat.get("throttled_time", 0)) / 1e9

    def remove(self) -> None:
        for name, group in self.groups.items():
            try:
                for pid in (group / "cgroup.procs").read_text().split():
                    try:
                        (self.base / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass  # it exited meanwhile
                group.rmdir()
            except OSError as exc:
                log.warning("could not remove the CPU group of %s: %s", name, exc)
        self.groups.clear()
