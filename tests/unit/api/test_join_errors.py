"""What ``lowband.join`` refuses, before the node joins anything, and how it says it: a model that is not the run's
(every difference listed: names, shapes, dtypes, frozen or not), a recipe whose inner step lowband must take itself,
an optimizer over tensors that are not the model's, a scheduler whose state cannot be checkpointed, and arguments
that name no run or talk in clear off loopback. Each refusal leaves the run without the node."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lowband
from node.config import TaskConfig
from node.recipes import make_run_config
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.transport.inprocess_plane import InProcessRun

TASK = TaskConfig("gpt", {"size": "tiny", "batch_size": 2, "block_size": 16, "n_embd": 32, "n_layer": 1, "n_head": 2})


def run(recipe: str = "sign", **task: Any) -> InProcessRun:
    cfg = make_run_config(recipe, {"H": 1 if recipe == "ddp" else 2}, task=TaskConfig("gpt", {**TASK.params, **task}), rounds=2,
                          run_id="api-errors")
    return InProcessRun(cfg, load_task(cfg.task.name, **cfg.task.params))


def model_of(**task: Any) -> nn.Module:
    return build_seeded(load_task("gpt", **{**TASK.params, **task}), 5)


def try_join(tmp_path: Path, r: InProcessRun, model: nn.Module, **kwargs: Any) -> lowband.Session:
    optimizer = kwargs.pop("optimizer", None) or torch.optim.AdamW(model.parameters())
    return lowband.join(model, optimizer, workdir=tmp_path / "n", name="n", plane=r.plane("n"), **kwargs)


def test_a_model_of_other_shapes_is_refused_naming_each_tensor(tmp_path: Path) -> None:
    r = run()
    with pytest.raises(lowband.ModelMismatch) as caught:
        try_join(tmp_path, r, model_of(n_embd=48))
    text = str(caught.value)
    assert "your model is not the run's model (what task 'gpt' builds" in text
    assert "parameter 'wte.weight': shape [256, 48] in your model, [256, 32] in the run's" in text
    assert "... and" in text and len(caught.value.differences) > 12  # every tensor, the first 12 shown
    assert not r.members


def test_missing_extra_frozen_and_dtype_differences_are_each_named(tmp_path: Path) -> None:
    model = model_of()
    model.extra = nn.Linear(2, 2)  # type: ignore[assignment]
    model.ln_f.weight.requires_grad_(False)
    model.h[0].ln_1.bias.data = model.h[0].ln_1.bias.data.double()
    del model.h[0].mlp.c_fc.bias
    model.h[0].mlp.c_fc.bias = None  # type: ignore[assignment]
    with pytest.raises(lowband.ModelMismatch) as caught:
        try_join(tmp_path, run(), model)
    assert set(caught.value.differences) == {
        "parameter 'h.0.mlp.c_fc.bias' (float32 [128]) is missing from your model",
        "parameter 'extra.weight' (float32 [2, 2]) is in your model, not in the run's",
        "parameter 'extra.bias' (float32 [2]) is in your model, not in the run's",
        "parameter 'h.0.ln_1.bias': dtype float64 in your model, float32 in the run's",
        "parameter 'ln_f.weight': frozen in your model, trainable in the run's (requires_grad)",
    }


def test_a_bf16_model_for_an_fp32_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(lowband.ModelMismatch, match=r"dtype bfloat16 in your model, float32 in the run's"):
        try_join(tmp_path, run(), model_of().to(torch.bfloat16))


def test_a_recipe_that_sends_gradients_every_step_needs_the_task_seam(tmp_path: Path) -> None:
    with pytest.raises(lowband.ConfigError, match=r"recipe 'ddp' sends a gradient every step .* `lowband node`"):
        try_join(tmp_path, run("ddp"), model_of())


def test_an_optimizer_over_tensors_that_are_not_the_models_is_refused(tmp_path: Path) -> None:
    model = model_of()
    stray = nn.Parameter(torch.zeros(3, 3))
    optimizer = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    r = run()
    with pytest.raises(lowband.ConfigError, match=r"steps 1 tensor\(s\) that are not parameters of the model"):
        try_join(tmp_path, r, model, optimizer=optimizer)
    assert not (tmp_path / "n" / "rounds.jsonl").exists()


def test_a_scheduler_whose_state_is_not_json_is_refused(tmp_path: Path) -> None:
    class Opaque:
        def state_dict(self) -> dict[str, Any]:
            return {"weights": torch.ones(2)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    with pytest.raises(lowband.ConfigError, match=r"scheduler's state_dict\(\) must be JSON-able"):
        try_join(tmp_path, run(), model_of(), scheduler=Opaque())


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give either coordinator='HOST:PORT' or dht=\\[MADDR, ...\\]"),
    ({"coordinator": "127.0.0.1:1", "dht": ["/ip4/127.0.0.1/tcp/1"]}, "give either"),
    ({"dht": ["/ip4/127.0.0.1/tcp/1"]}, "dht needs run=RUN.toml"),
    ({"coordinator": "203.0.113.7:7070"}, "refusing to talk to 203.0.113.7:7070 without TLS"),
    ({"coordinator": "http://127.0.0.1:7070"}, "coordinator 'http://127.0.0.1:7070': give HOST:PORT without a scheme"),
    ({"coordinator": "127.0.0.1"}, "coordinator '127.0.0.1': no port; give HOST:PORT"),
    ({"coordinator": "127.0.0.1:abc"}, "the port must be a number 1..65535, got 'abc'"),
    ({"coordinator": "127.0.0.1:1", "name": "no spaces"}, "name: node name 'no spaces' is not"),
    ({"coordinator": "127.0.0.1:1", "checkpoint_every": 0}, "checkpoint_every must be at least 1"),
])
def test_arguments_that_name_no_run_or_talk_in_clear_are_refused(tmp_path: Path, kwargs: dict[str, Any],
                                                                 message: str) -> None:
    model = model_of()
    with pytest.raises(lowband.ConfigError, match=message):
        lowband.join(model, torch.optim.AdamW(model.parameters()), workdir=tmp_path / "n", **kwargs)
    assert not (tmp_path / "n" / "node.key").exists()  # nothing was started


def test_the_package_exports_the_api() -> None:
    import node.api

    assert set(lowband.__all__) <= set(dir(lowband)) | {"LowbandCallback"}
    assert lowband.join is node.api.join and lowband.Session is node.api.Session


def test_a_serverless_join_takes_the_runs_authority_and_the_grants_name(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``dht=``: the run file must carry its [authority]; a closed run's grant in the workdir names the node (another
    name is refused) — what ``lowband node --dht`` checks, before any DHT peer starts."""
    from node.cli import main
    from node.runfile import build_run_file

    model = model_of()
    template = tmp_path / "template.toml"
    template.write_text(build_run_file(run_id="template", recipe="sign", rounds=2, task_params=dict(TASK.params)))
    dht = ["/ip4/127.0.0.1/tcp/1"]
    with pytest.raises(lowband.ConfigError, match=r"no \[authority\] section"):
        lowband.join(model, torch.optim.AdamW(model.parameters()), workdir=tmp_path / "n", run=template, dht=dht)
    run = tmp_path / "run.toml"
    assert main(["run", "init", "--from", str(template), "--out", str(run), "--id", "api-dht"]) == 0
    assert main(["run", "grant", "--run", str(run), "--authority-key", str(tmp_path / "run.authority.key"),
                 "--workdir", str(tmp_path / "n"), "--name", "gpu0"]) == 0
    capsys.readouterr()
    with pytest.raises(lowband.ConfigError, match=r"the name 'gpu1', but .* grants the name 'gpu0'"):
        lowband.join(model, torch.optim.AdamW(model.parameters()), workdir=tmp_path / "n", run=run, dht=dht,
                     name="gpu1")


def test_a_coordinator_that_never_answers_is_given_up_on_after_connect_timeout_s(tmp_path: Path) -> None:
    import socket

    # a port bound (so nothing else takes it) but not listening: every connection is refused
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        model = model_of()
        with pytest.raises(lowband.CoordinatorUnreachable, match=address):
            lowband.join(model, torch.optim.AdamW(model.parameters()), workdir=tmp_path / "n", name="n",
                         coordinator=address, connect_timeout_s=0.5)
    assert not (tmp_path / "n" / "rounds.jsonl").exists()  # nothing joined, nothing logged
