"""Fixtures for the DhtTransport tests (module-scoped: a DHT per peer is slow to start)."""
from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from node.config import TaskConfig
from node.recipes import make_run_config
from node.train.simulate import build_task

from dht_harness import TASK_PARAMS, p2pd_pids


@pytest.fixture(scope="module")
def no_orphaned_p2pd() -> Iterator[None]:
    """Every p2pd these tests start must be gone after them (only pids that appeared during the module count)."""
    before = p2pd_pids()
    yield
    deadline = time.monotonic() + 15
    while (left := p2pd_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a process table, not synchronising peers
    assert not left, f"p2pd processes left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """A tiny sign-recipe run config and its task (the stdlib corpus cached under this session's temp dir)."""
    cache = tmp_path_factory.getbasetemp() / "lowband-corpus-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBAND_CACHE", str(cache))
        cfg = make_run_config("sign", {"H": 2}, task=TaskConfig("gpt", dict(TASK_PARAMS)), workers=3, rounds=3,
                              seed=0)
        yield cfg, build_task(cfg)
