"""``import lowband``: the public Python API, re-exported from node/api.py (docs/api.md).

    session = lowband.join(model, optimizer, run="run.toml", coordinator="host:7070", workdir="./node0")

``lowband.LowbandCallback`` (the Hugging Face ``Trainer`` callback) imports transformers on first use.
"""
from __future__ import annotations

from typing import Any

from node import api as _api
from node.api import ConfigError, CoordinatorUnreachable, JoinRefused, ModelMismatch, RoundReport, Session, join

__all__ = ["ConfigError", "CoordinatorUnreachable", "JoinRefused", "LowbandCallback", "ModelMismatch", "RoundReport",
           "Session", "join"]


def __getattr__(name: str) -> Any:
    return getattr(_api, name)
