"""The ``cluster`` fixture: stops every process a test started (also on failure) and prints their logs' tails
when the test failed. Helpers live in lowband_cluster.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from lowband_cluster import Cluster


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            print(c.dump_logs())
