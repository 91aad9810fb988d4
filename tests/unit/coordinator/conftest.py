"""The per-test fixtures of the CoordinatorCore test modules (test_core_*.py): a fake clock, a factory of
harnesses that closes them all after the test, and one default harness. Requested by name only (no autouse),
so they change nothing for the other modules here. The harness itself: core_harness.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from core_harness import Clock, Harness


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(tmp_path: Path, clock: Clock) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(overrides: dict[str, dict[str, Any]] | None = None, state: str = "state") -> Harness:
        h = Harness(tmp_path / state, clock, overrides)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


@pytest.fixture
def h(make: Callable[..., Harness]) -> Harness:
    return make()
