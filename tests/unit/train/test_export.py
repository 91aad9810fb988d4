"""``lowband export`` (issue 15, a way out): a node's checkpoint or a coordinator's state → a safetensors file that
loads with ``model.load_state_dict(safetensors.torch.load_file(path))`` into the model the task builds: θ_ref,
the agreed buffers, frozen parameters, tied ones under every name. Harness: models_harness.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from coordinator.store import Store
from node.cli import main
from node.config import TaskConfig
from node.roundlog import RoundRow
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train import checkpoint
from models_harness import SHAPES, Cluster, run_config

GPT = TaskConfig("gpt", dict(size="tiny", batch_size=2, block_size=16, eval_batches=1, n_embd=32, n_layer=1, n_head=2))


def _trained(task_cfg: TaskConfig, dtype: str | None = None) -> Cluster:
    if dtype:
        task_cfg = TaskConfig(task_cfg.name, {**task_cfg.params, "dtype": dtype})
    cfg = run_config("diloco", task_cfg, workers=2)
    cl = Cluster(cfg, load_task(cfg.task.name, **cfg.task.params))
    for r in range(2):
        cl.round(r)
    return cl


def _check(out: Path, cl: Cluster) -> torch.nn.Module:
    w = cl.workers[0]
    model = build_seeded(cl.task, cl.cfg.seed)  # what a user builds from the task
    model.load_state_dict(load_file(out))  # strict: every key, nothing more
    got = dict(model.named_parameters())
    for name, ref in zip(w.names, w.ref):
        assert torch.equal(got[name], ref.to(got[name].dtype)), name
    bufs = dict(model.named_buffers())
    for name, b in zip(w.reference.buffer_names, w.reference.buffers):
        assert torch.equal(bufs[name], b), name
    with w.reference_weights() as reference_model:
        assert cl.task.evaluate(model) == cl.task.evaluate(reference_model)
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["lowband"])
    assert meta["committed_rounds"] == 2 and meta["fingerprint"] == w.fingerprint()
    return model


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_export_from_a_node_workdir(tmp_path: Path, dtype: str | None) -> None:
    cl = _trained(SHAPES, dtype)
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / checkpoint.FILE).write_bytes(checkpoint.dumps(cl.workers[0], node="w0", config_hash="h"))
    assert main(["export", "--workdir", str(tmp_path / "node"), "--out", str(tmp_path / "model.safetensors")]) == 0
    model = _check(tmp_path / "model.safetensors", cl)
    assert torch.equal(model.stem.weight, build_seeded(cl.task, cl.cfg.seed).stem.weight)  # frozen: as built


def test_export_of_a_tied_model_writes_each_name(tmp_path: Path) -> None:
    cl = _trained(GPT)
    (tmp_path / checkpoint.FILE).write_bytes(checkpoint.dumps(cl.workers[0], node="w0", config_hash="h"))
    assert main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "gpt.safetensors")]) == 0
    model = _check(tmp_path / "gpt.safetensors", cl)
    assert set(load_file(tmp_path / "gpt.safetensors")) >= {"wte.weight", "lm_head.weight"}
    assert model.lm_head.weight is model.wte.weight


def test_export_from_a_coordinator_state_dir(tmp_path: Path) -> None:
    cl = _trained(SHAPES)
    store = Store(tmp_path / "state")
    committed = cl.workers[0].reference.committed_rounds
    row = RoundRow(committed - 1, time.time(), ["w0", "w1"], "test", cl.workers[0].fingerprint(), 0, 0, 0.0, 1.0,
                   float("nan"), "all_submitted")
    store.commit_round(row, {}, {})
    # the snapshot of the last round (coordinator/snapshot.py writes this format); replaying is tested with the core
    store.snapshot_path(committed).write_bytes(cl.workers[0].reference.to_bytes())
    store.close()
    assert main(["export", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "m.safetensors")]) == 0
    _check(tmp_path / "m.safetensors", cl)


def test_export_refuses_what_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04old")
    assert main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint.pt is from an older lowband" in capsys.readouterr().err
    (tmp_path / checkpoint.FILE).write_bytes(b"PK\x03\x04" + b"\0" * 64)
    assert main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "torch.save" in capsys.readouterr().err
    assert main(["export", "--state-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a coordinator state dir" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_task_path_makes_a_task_module_importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    (tmp_path / "mytasks").mkdir()
    (tmp_path / "mytasks" / "__init__.py").write_text("from node.tasks.examples.shapes import shapes_task\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["--task-path", str(tmp_path), "export", "--workdir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "x")]) == 2
    assert str(tmp_path.resolve()) == sys.path[0]
    assert load_task("mytasks:shapes_task", batch_size=4).batch_size == 4
