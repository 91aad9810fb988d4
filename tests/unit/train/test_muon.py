"""``inner.optimizer = "muon"``: which tensors Muon takes (the hidden matrices) and which AdamW keeps, that the combined
optimizer steps exactly as the two torch optimizers would on their own, that its state survives a checkpoint to the
bit, and that every recipe with local steps runs with it."""
from __future__ import annotations

import pytest
import torch

from node.config import InnerConfig, TaskConfig
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train import checkpoint
from node.train.inner import make_inner_optimizer
from node.train.muon import MuonAdamW, is_hidden_matrix
from node.train.simulate import simulate
from models_harness import Cluster, run_config

GPT = dict(size="tiny", batch_size=2, block_size=16, eval_batches=1, n_embd=32, n_layer=1, n_head=2)


def test_the_hidden_matrices_go_to_muon_and_embeddings_head_norms_biases_to_adamw() -> None:
    model = build_seeded(load_task("gpt", **GPT), 0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = make_inner_optimizer(InnerConfig(optimizer="muon"), [p for _, p in named], [n for n, _ in named])
    assert isinstance(opt, MuonAdamW) and opt.muon is not None
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    hidden = sorted(n for n, p in named if id(p) in muon)
    assert hidden == ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight",
                      "h.0.mlp.c_proj.weight"]
    assert not is_hidden_matrix("wte.weight", named[0][1]) and not is_hidden_matrix("h.0.ln_1.weight", named[2][1])
    decayed = [p for g in opt.adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert {id(p) for p in decayed} == {id(p) for n, p in named if p.dim() == 2 and id(p) not in muon}


def test_the_combined_step_is_exactly_the_two_optimizers_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"h.w": torch.randn(6, 4, generator=gen), "wte": torch.randn(5, 4, generator=gen),
               "h.b": torch.randn(4, generator=gen)}
    ours = {n: t.clone().requires_grad_() for n, t in tensors.items()}
    ref = {n: t.clone().requires_grad_() for n, t in tensors.items()}
    opt = MuonAdamW(list(ours.items()), lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    muon = torch.optim.Muon([ref["h.w"]], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [ref["wte"]], "weight_decay": 0.1},
                               {"params": [ref["h.b"]], "weight_decay": 0.0}], lr=0.01, betas=(0.9, 0.95))
    for step in range(3):
        grads = {n: torch.randn(t.shape, generator=gen) for n, t in tensors.items()}
        for d in (ours, ref):
            for n, p in d.items():
                p.grad = grads[n].clone()
        opt.step()
        muon.step()
        adamw.step()
        for n in tensors:
            assert torch.equal(ours[n], ref[n]), (step, n)


def test_its_state_round_trips_a_checkpoint_and_training_goes_on_identically() -> None:
    cfg = run_config("diloco", TaskConfig("gpt", GPT), {"inner.optimizer": "muon"}, workers=1)
    a = Cluster(cfg, load_task("gpt", **GPT), names=("w0",))
    a.round(0)
    blob = checkpoint.dumps(a.workers[0], node="w0", config_hash="h")
    a.round(1)
    b = Cluster(cfg, load_task("gpt", **GPT), names=("w0",))
    checkpoint.loads(b.workers[0], blob)
    b.round(1)
    assert b.workers[0].fingerprint() == a.workers[0].fingerprint()
    assert all(torch.equal(x, y) for x, y in zip(a.workers[0].masters, b.workers[0].masters))


@pytest.mark.parametrize("recipe", ["diloco", "sign", "dct-consistent", "sparseloco", "sign-nesterov"])
def test_every_recipe_with_local_steps_trains_with_muon(recipe: str) -> None:
    cfg = run_config(recipe, TaskConfig("gpt", GPT), {"inner.optimizer": "muon"}, workers=2, rounds=2)
    res = simulate(cfg)
    assert res.history[-1].replicas_identical and 0 < res.final_val_loss < 10
