"""``lowband bench byzantine``: the attacks as transformations of the attacker's update (by hand), the grid, and one
tiny case end to end through the simulator (signed frames, the robust settings, the report)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from node.bench.attacks import ALIE_Z, SCALE, make_attack
from node.bench.byzantine import Case, cases, markdown, run_byzantine_bench


def _worker(deltas: list[torch.Tensor], scale: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(pending=SimpleNamespace(round=0, deltas=deltas), payload_scale=lambda r: scale)


def test_attacks_transform_the_update_before_it_is_encoded() -> None:
    xs = [torch.tensor([3.0, -4.0]), torch.tensor([1.0])]
    none = lambda: []  # noqa: E731
    scaled = make_attack("scale", 0, none, none)(xs)
    assert all(torch.equal(s, x * torch.tensor(SCALE, dtype=torch.float32)) for s, x in zip(scaled, xs))
    assert [x.tolist() for x in make_attack("flip", 0, none, none)(xs)] == [[-3.0, 4.0], [-1.0]]
    noisy = make_attack("noise", 5, none, none)(xs)
    assert [float(n.norm()) for n in noisy] == pytest.approx([5.0, 1.0])  # the norm of the honest update
    assert not torch.allclose(noisy[0] / 5, xs[0] / 5)
    honest = [_worker([torch.tensor([1.0, 0.0])], 2.0), _worker([torch.tensor([3.0, 4.0])], 2.0)]
    me = _worker([torch.zeros(2)], 2.0)
    (alie,) = make_attack("alie", 0, lambda: honest, lambda: me)([torch.zeros(2)])
    # honest x = 2·Δ: (2, 0) and (6, 8): mean (4, 4), sample std (2.828, 5.657)
    assert alie.tolist() == pytest.approx([4 - ALIE_Z * 8 ** 0.5, 4 - ALIE_Z * 32 ** 0.5])
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("sybil", 0, none, none)


def test_the_grid_runs_clean_baselines_first_and_plain_runs_where_asked() -> None:
    grid = cases(["sign"], ["scale", "flip"], [1, 2], "both", plain_attackers=[1])
    assert [c.key for c in grid] == ["sign/none/0/off", "sign/none/0/on", "sign/scale/1/off", "sign/scale/1/on",
                                     "sign/flip/1/off", "sign/flip/1/on", "sign/scale/2/on", "sign/flip/2/on"]
    assert Case("diloco", "alie", 2, True).key == "diloco/alie/2/on"


def test_one_tiny_case_end_to_end(tmp_path: Path) -> None:
    rows = run_byzantine_bench(tmp_path, recipes=["sign"], attacks=["scale"], attackers=[1], robust="on",
                               workers=3, rounds=2, H=1, batch_size=2, eval_batches=1, evals=1)
    by = {r["case"]: r for r in rows}
    assert set(by) == {"sign/none/0/off", "sign/none/0/on", "sign/scale/1/on"}
    attacked = by["sign/scale/1/on"]
    assert attacked["replicas_identical"] and attacked["flagged_attackers"] == 2 and attacked["flagged_honest"] == 0
    assert attacked["overrides"]["reduce.robust"] == "vote" and attacked["cosine_attackers"] is not None
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert (tmp_path / "byzantine.png").stat().st_size > 1000
    md = (tmp_path / "results.md").read_text()
    assert "| scale | 1 | not run |" in md and md == markdown(rows, _meta(md))
    again = run_byzantine_bench(tmp_path, recipes=["sign"], attacks=["scale"], attackers=[1], robust="on",
                                workers=3, rounds=2, H=1, batch_size=2, eval_batches=1, evals=1)
    assert [r["wall_s"] for r in again] == [r["wall_s"] for r in rows]  # nothing run twice


def _meta(md: str) -> dict[str, str]:
    lines = md.splitlines()
    commit, date = lines[2][len("Commit: "):].split(", date: ")
    return {"command": lines[0][len("Command: `"):-1], "machine": lines[1][len("Machine: "):], "commit": commit,
            "date": date, "setup": lines[3][len("Setup: "):]}
