"""Fixtures every test module gets: one torch thread, and one stdlib-corpus cache per session."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Test tensors are small: on a shared 2-core box intra-op threads only spin against each other (up to
    tens of times slower). Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The stdlib corpus is built once per session into its temp dir; LOWBAND_CACHE points every task (and
    every child process a test starts) there, so tests never touch the user's cache."""
    cache = tmp_path_factory.getbasetemp() / "lowband-corpus-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBAND_CACHE", str(cache))
        yield
