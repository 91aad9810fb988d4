"""Fixtures of the security tests: generated certificates (``pki``) and a factory of coordinators with members
(``trial``), every one stopped after its test. The harness: security_harness.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from security_harness import Pki, Trial, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def trial(tmp_path: Path) -> Iterator[Callable[..., Trial]]:
    made: list[Trial] = []

    def factory(name: str = "run", **kw: Any) -> Trial:
        t = Trial(tmp_path / name, **kw)
        made.append(t)
        return t

    yield factory
    for t in made:
        t.close()
