"""Named recipes: each a preset of codec × feedback × outer optimizer with its defaults.

The update rule, defaults, bytes and citation of every recipe: docs/algorithms.md, §3."""
from __future__ import annotations

from node.config import CodecConfig, InnerConfig, OuterConfig, Recipe, RunConfig, TaskConfig, apply_overrides
from node.errors import ConfigError

_DCT = CodecConfig("dct_topk", {"k": 32, "chunk": 64, "values": "f16", "reduce": "selector-mean"})

RECIPES: dict[str, Recipe] = {
    # Every step: mean gradient (fp32) then one AdamW step. The anchor for quality and bytes.
    # Clipping happens once, on the mean gradient (outer clip_norm), as in DDP: no per-worker inner clip.
    "ddp": Recipe("ddp", H=1, codec=CodecConfig("identity"), inner=InnerConfig(optimizer="grad", grad_clip=None),
                  outer=OuterConfig("adamw", lr=1.0, lr_follows_inner=True, clip_norm=1.0,
                                    params={"betas": [0.9, 0.95], "weight_decay": 0.1})),
    # DiLoCo: dense mean of Δ, Nesterov outer step (docs/algorithms.md, §3 diloco; arXiv 2311.08105).
    "diloco": Recipe("diloco", H=500, codec=CodecConfig("identity"),
                     outer=OuterConfig("nesterov", lr=0.7, params={"momentum": 0.9})),
    # Distributed sign momentum as published (arXiv 2411.17866): dense exchange, Lion-style global step
    # (docs/algorithms.md, §3 dsm).
    # γ = 4: the standard profile's sweep winner (1, 4 tried; BENCHMARKS.md "Tuned defaults").
    "dsm": Recipe("dsm", H=12, codec=CodecConfig("identity"), payload_scale="inverse_inner_lr",
                  inner=InnerConfig(lr=5e-4),
                  outer=OuterConfig("sign_momentum", lr=4.0, lr_follows_inner=True,
                                    params={"betas": [0.95, 0.98], "weight_decay": 0.1})),
    # dsm's global step on 1-bit sign uploads with error feedback (docs/algorithms.md, §3 sign). γ = 8: the standard
    # quality profile's sweep winner (1, 4, 8, 16 tried; BENCHMARKS.md "Tuned defaults").
    "sign": Recipe("sign", H=12, codec=CodecConfig("sign", {"block": 0, "scale_dtype": "f32", "reduce": "mean"}),
                   feedback_decay=1.0, payload_scale="inverse_inner_lr", inner=InnerConfig(lr=5e-4),
                   outer=OuterConfig("sign_momentum", lr=8.0, lr_follows_inner=True,
                                     params={"betas": [0.95, 0.98], "weight_decay": 0.1})),
    # Decoupled DCT momentum, faithful (arXiv 2510.03371): per-worker momentum, replicas drift
    # (docs/algorithms.md, §3 dct). lr 0.1 and β 0.9: the standard profile's stable winner (lr 0.7 diverges there).
    "dct": Recipe("dct", H=128, codec=_DCT, feedback_decay=0.9,
                  outer=OuterConfig("decoupled_nesterov", lr=0.1, params={"momentum": 0.9})),
    # Replica-consistent variant: every worker applies only the agreed aggregate Q. Outer lr 1.5: the standard profile's
    # sweep winner (1.0, 1.5, 2.0 tried; 0.7 on the quick profile).
    "dct-consistent": Recipe("dct-consistent", H=128, codec=_DCT, feedback_decay=0.95,
                             outer=OuterConfig("nesterov", lr=1.5, params={"momentum": 0.0})),
    # SparseLoCo (arXiv 2508.15706; docs/algorithms.md, §3 sparseloco): chunked top-k (4 of 256 entries, 1.6 %, the
    # paper's density) with 2-bit quantized values; the error-feedback residual with decay β stands in for the outer
    # momentum, and the outer step is plain averaged SGD. Chunk 256 and outer lr 4: the standard profile's sweep winners
    # (the paper's 64 of 4096 and lr 1, 2, 8 tried; BENCHMARKS.md "Tuned defaults").
    "sparseloco": Recipe("sparseloco", H=30, codec=CodecConfig("sparse_topk", {"k": 4, "chunk": 256, "bits": 2,
                                                                             "range_sigmas": 6.0, "reduce": "mean"}),
                         feedback_decay=0.95, outer=OuterConfig("nesterov", lr=4.0, params={"momentum": 0.0})),
    # lowband's own: the sign recipe's 1-bit payload with error feedback under DiLoCo's Nesterov outer step instead
    # of the sign-momentum global step (docs/algorithms.md, §3 sign-nesterov).
    "sign-nesterov": Recipe("sign-nesterov", H=16, codec=CodecConfig("sign", {"block": 0, "scale_dtype": "f32",
                                                                              "reduce": "mean"}),
                            feedback_decay=1.0, outer=OuterConfig("nesterov", lr=0.7, params={"momentum": 0.9})),
    # DeMo (arXiv 2411.19870): every step, DCT-top-k of a local momentum of gradients, sign step on the
    # aggregate (docs/algorithms.md, §3 demo).
    "demo": Recipe("demo", H=1, codec=_DCT, feedback_decay=0.999, payload_scale="inner_lr",
                   inner=InnerConfig(optimizer="grad", grad_clip=None),
                   outer=OuterConfig("sign_sgd", lr=1.0, lr_follows_inner=True, params={"weight_decay": 0.0})),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}") from None


def make_run_config(recipe: str, overrides: dict | None = None, task: TaskConfig | None = None,
                    workers: int = 4, rounds: int = 10, seed: int = 0, run_id: str = "lowband") -> RunConfig:
    cfg = RunConfig(recipe=get_recipe(recipe), task=task or TaskConfig(), workers=workers, rounds=rounds,
                    seed=seed, run_id=run_id)
    return apply_overrides(cfg, overrides or {})
