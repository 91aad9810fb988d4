"""CpuBudget: a cgroup CPU quota per emulated host (root only; skipped with the reason elsewhere)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from node.netem import cpu

OK, WHY = cpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=WHY or "cgroups unavailable")


def test_a_host_gets_its_quota_holds_the_process_and_is_removed_afterwards() -> None:
    budget = cpu.CpuBudget(prefix="lbtest")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        group = budget.host("n0", 0.25)
        budget.add("n0", child.pid)
        if (group / "cpu.max").exists():
            assert (group / "cpu.max").read_text().split() == ["25000", "100000"]
        else:
            assert (group / "cpu.cfs_quota_us").read_text().strip() == "25000"
            assert (group / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert str(child.pid) in (group / "cgroup.procs").read_text().split()
        assert budget.throttled_s("n0") >= 0.0
        with pytest.raises(ValueError, match="positive number of cores"):
            budget.host("n1", 0)
    finally:
        budget.remove()
        child.communicate(b"", timeout=30)
    assert not group.exists()
    assert child.returncode == 0
