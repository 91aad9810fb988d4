"""Round logs, the audit trails that tools and people read (never the processes' private stores):

- a node's ``rounds.jsonl`` in its workdir, written by the daemon: one JSON object per applied round
  (``"round"``), adopted state (``"event": "state"``) or checkpoint resumed from (``"event": "resumed"``, with the
  ``committed_rounds`` it holds: rounds from there on that the log already lists are applied again after it);
- a coordinator's ``rounds.jsonl`` in its state dir: one ``RoundRow`` per committed round, written after the
  round is durable in the coordinator's store, and ``{"round": r, "val_loss": v}`` lines once the evaluator
  scored round r's reference.

Only complete lines count: the writer may be appending one right now.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

COORDINATOR_LOG = "rounds.jsonl"


@dataclass
class RoundRow:
    """One committed round as the coordinator records it."""

    round: int
    committed_at: float  # unix time, seconds
    members: list[str]  # names, sorted
    reason: str  # for people
    fingerprint: str  # the reference after the round
    bytes_in: int  # payload bytes received for the round
    bytes_out: int  # result bytes the round costs to hand out
    duration_s: float  # first to last accepted payload
    mean_loss: float  # members' mean train loss (NaN: none reported)
    val_loss: float  # the evaluator's loss of the reference after the round (NaN: not evaluated)
    close: str = ""  # ``node.membership.CloseKind`` value: why the round closed
    robust: dict[str, Any] | None = None  # the round's accountability report, [recipe.reduce] on (RoundReport.to_json)

    def to_json(self) -> str:
        d = asdict(self)
        if d["robust"] is None:  # [recipe.reduce] off: the line is what it was before reports existed
            del d["robust"]
        return json.dumps(d, allow_nan=True)


def _complete_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def read_round_log(workdir: Path) -> list[dict[str, Any]]:
    return _complete_lines(Path(workdir) / "rounds.jsonl")


def applied_rounds(workdir: Path) -> list[dict[str, Any]]:
    """The applied-round entries (state adoptions left out)."""
    return [e for e in read_round_log(workdir) if "round" in e]


def append_line(path: Path, entry: dict[str, Any] | str) -> None:
    """Append one JSON line and make it durable (the audit trail survives a crash right after)."""
    import os

    with open(path, "a") as f:
        f.write((entry if isinstance(entry, str) else json.dumps(entry)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def coordinator_rounds(state_dir: Path) -> list[RoundRow]:
    """The committed rounds a coordinator logged in ``state_dir``, in order, with their evaluator losses."""
    rows: dict[int, RoundRow] = {}
    val: dict[int, float] = {}
    for e in _complete_lines(Path(state_dir) / COORDINATOR_LOG):
        if "committed_at" in e:
            rows[e["round"]] = RoundRow(**e)
        elif "val_loss" in e:
            val[e["round"]] = float(e["val_loss"])
    for r, v in val.items():
        if r in rows:
            rows[r].val_loss = v
    return [rows[r] for r in sorted(rows)]
