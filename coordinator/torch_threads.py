"""The threads of the coordinator's torch work (reduce, outer step, evaluation): set explicitly at start-up.

torch's default is one intra-op thread per core. On a coordinator that shares its cores with gRPC handlers, its
evaluator and, on small deployments, nodes, that default oversubscribes them: with 2 torch threads on 2 busy cores
the reduce and outer step were measured 20–60× slower than with one (issue 20). ``lowband coordinator
--torch-threads N`` (default 1) sets both pools before any torch work starts; raise it on a dedicated many-core host.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def apply_torch_threads(threads: int) -> dict[str, int]:
    """Set torch's intra-op and inter-op thread pools to ``threads`` each (≥ 1) and return what torch then reports
    (``torch_threads()``). The inter-op pool can be sized only before its first use, once per process: when that has
    passed, it is left as it is and a warning says so. Raises ValueError for ``threads`` < 1."""
    if threads < 1:
        raise ValueError(f"torch threads must be ≥ 1, got {threads}")
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as exc:  # the pool has started, or was sized already: torch allows it once
            log.warning("inter-op threads stay at %d (wanted %d): %s", torch.get_num_interop_threads(), threads, exc)
    return torch_threads()


def torch_threads() -> dict[str, int]:
    """``{"intra": …, "interop": …}``: the sizes of torch's two thread pools in this process, as torch reports them."""
    return {"intra": torch.get_num_threads(), "interop": torch.get_num_interop_threads()}
