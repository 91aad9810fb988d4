"""Reading a node's round log (``rounds.jsonl`` in its workdir, written by the daemon): one JSON object per
applied round (``"round"``) or adopted state (``"event": "state"``). Only complete lines count: the node may be
appending one right now."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_round_log(workdir: Path) -> list[dict[str, Any]]:
    path = Path(workdir) / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def applied_rounds(workdir: Path) -> list[dict[str, Any]]:
    """The applied-round entries (state adoptions left out)."""
    return [e for e in read_round_log(workdir) if "round" in e]
