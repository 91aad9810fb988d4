"""Recipe oracles (spec §8) through the real Worker round code on a tiny deterministic toy task.

Rounds are driven by hand: every worker trains and prepares its frame, frames go through an
``InProcessHub``, then every worker applies the collected round. Expected values are computed
independently (own inner loops on model copies, hand-written outer rules) in fp32, the Worker's master
precision, so tolerances are ~1e-5.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from node import wire
from node.compress import dct, make_codec
from node.config import TaskConfig
from node.errors import ConfigError
from node.recipes import make_run_config
from node.tasks.base import Batch, Task
from node.train.worker import ApplyReport, Worker
from node.transport.inprocess import InProcessHub, InProcessTransport

IN, OUT, BATCH = 8, 4, 16
TOY_TASK = TaskConfig("test_recipe_oracles:make_task", {})


# -- the toy task --------------------------------------------------------------------------------------------

class ToyModel(nn.Module):
    """Linear regression with an extra 1-D bias-like parameter (so 2-D and 1-D tensors both occur)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN, OUT)
        self.offset = nn.Parameter(torch.randn(OUT) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.offset


class ToyTask(Task):
    name = "toy"

    def __init__(self, batch_size: int = BATCH) -> None:
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(1234)
        self.w_true = torch.randn(OUT, IN, generator=g) * 2.0
        self.b_true = torch.randn(OUT, generator=g) + 1.0
        vg = torch.Generator().manual_seed(999)
        self.val_x = torch.randn(64, IN, generator=vg)
        self.val_y = self._target(self.val_x, vg)

    def _target(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return x @ self.w_true.T + self.b_true + 0.1 * torch.randn(x.shape[0], OUT, generator=g)

    @property
    def fingerprint(self) -> str:
        return "toy-linear-v1"

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ToyModel()

    def batches(self, worker: int, num_workers: int, seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + worker * 1009 + num_workers)
        while True:
            x = torch.randn(self.batch_size, IN, generator=g)
            yield x, self._target(x, g)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)

    def evaluate(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(F.mse_loss(model(self.val_x), self.val_y))


def make_task(**kwargs: Any) -> ToyTask:
    return ToyTask(**kwargs)


TASK = ToyTask()

# Constant inner lr (no warmup, no decay) unless a test says otherwise, so that references are simple.
CONST_LR = {"inner.warmup_steps": 0, "inner.min_lr_ratio": 1.0}
BLOCK_ALL = {"codec.k": 4096, "codec.values": "f32"}  # k ≥ block size: every DCT coefficient is sent


def config(recipe: str, overrides: dict[str, Any] | None = None, workers: int = 3, rounds: int = 3,
           lr: float = 0.01):
    base: dict[str, Any] = {"inner.lr": lr, **CONST_LR}
    if recipe not in ("ddp", "demo"):
        base["H"] = 3
    return make_run_config(recipe, {**base, **(overrides or {})}, task=TOY_TASK, workers=workers, rounds=rounds)


# -- driving rounds by hand -----------------------------------------------------------------------------------

class Cluster:
    def __init__(self, cfg, n: int | None = None, min_members: int = 1) -> None:
        n = cfg.workers if n is None else n
        self.cfg = cfg
        self.workers = [Worker(f"w{i}", cfg, TASK, shard=i, num_shards=n) for i in range(n)]
        self.hub = InProcessHub(min_members=min_members)
        self.links: list[InProcessTransport] = [self.hub.connect(w.name) for w in self.workers]
        for link in self.links:
            link.join()
        self.lrs: list[float] = []
        self.frames: list[bytes] = []

    def train_prepare(self, r: int) -> list[bytes]:
        self.lrs, self.frames = [], []
        for w in self.workers:
            stats = w.train()
            self.lrs.append(stats.last_lr)
            self.frames.append(w.prepare(r, stats.last_lr))
        return self.frames

    def exchange(self, r: int, skip: tuple[str, ...] = (), replace: dict[str, bytes] | None = None) -> list[ApplyReport]:
        replace = replace or {}
        for w, link, frame in zip(self.workers, self.links, self.frames):
            if w.name not in skip:
                link.submit(r, replace.get(w.name, frame))
        return [w.apply(link.collect(r)) for w, link in zip(self.workers, self.links)]

    def round(self, r: int, **kw: Any) -> list[ApplyReport]:
        self.train_prepare(r)
        return self.exchange(r, **kw)

    def prints(self) -> list[str]:
        return [w.fingerprint() for w in self.workers]


def refs(w: Worker) -> list[torch.Tensor]:
    return [r.detach().clone() for r in w.ref]


def local_params(w: Worker) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in w.params]


def grads(w: Worker) -> list[torch.Tensor]:
    return [p.grad.detach().float().clone() for p in w.params]


def decode_frame(w: Worker, frame: bytes, r: int) -> list[torch.Tensor]:
    """What a receiver reconstructs from ``frame``: unpack with a fresh codec, decode per tensor."""
    codec = make_codec(w.cfg.recipe.codec.name, w.cfg.recipe.codec.params)
    env = wire.unpack(frame, codec, w.spec, w.cfg.run_id, r)
    return [codec.decode(env.tensors[n], tuple(ref.shape)) for n, ref in zip(w.names, w.ref)]


def aggregate(w: Worker, frames: list[bytes], r: int) -> list[torch.Tensor]:
    """The round's reduced aggregate Q from the given frames (sorted by sender, as the worker does)."""
    codec = make_codec(w.cfg.recipe.codec.name, w.cfg.recipe.codec.params)
    envs = sorted((wire.unpack(f, codec, w.spec, w.cfg.run_id, r) for f in frames), key=lambda e: e.sender)
    return [codec.reduce([e.tensors[n] for e in envs], tuple(ref.shape)) for n, ref in zip(w.names, w.ref)]


def assert_all_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


class RefInner:
    """An independent inner loop on a model copy: same task batches, same optimizer, constant lr."""

    def __init__(self, cfg, shard: int, n: int) -> None:
        inner = cfg.recipe.inner
        self.model = TASK.build_model(cfg.seed)
        self.params = list(self.model.parameters())
        self.clip = inner.grad_clip
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": inner.weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = (torch.optim.AdamW(groups, lr=inner.lr, betas=inner.betas) if inner.optimizer == "adamw"
                    else torch.optim.SGD(groups, lr=inner.lr))
        self.batches = TASK.batches(shard, n, cfg.seed)

    def run(self, theta: list[torch.Tensor], H: int) -> list[torch.Tensor]:
        """Start from θ, take H steps, return Δ = θ − θ_after."""
        with torch.no_grad():
            for p, t in zip(self.params, theta):
                p.copy_(t)
        for _ in range(H):
            loss = TASK.loss(self.model, next(self.batches))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.opt.step()
        return [t - p.detach() for t, p in zip(theta, self.params)]

    def grad(self, theta: list[torch.Tensor]) -> list[torch.Tensor]:
        """One raw gradient at θ (no step): DeMo's / DDP's g."""
        with torch.no_grad():
            for p, t in zip(self.params, theta):
                p.copy_(t)
        self.model.zero_grad(set_to_none=True)
        TASK.loss(self.model, next(self.batches)).backward()
        return [p.grad.detach().clone() for p in self.params]


# -- oracle 5: diloco is torch's Nesterov SGD on the mean Δ ------------------------------------------------

@pytest.mark.parametrize("inner_opt", ["adamw", "sgd"])
def test_diloco_equals_torch_nesterov_on_mean_delta(inner_opt: str) -> None:
    n, rounds = 3, 3
    cfg = config("diloco", {"inner.optimizer": inner_opt}, workers=n, rounds=rounds)
    cl = Cluster(cfg)
    theta = [p.detach().clone().float() for p in TASK.build_model(cfg.seed).parameters()]
    outer = torch.optim.SGD(theta, lr=0.7, momentum=0.9, nesterov=True)
    inners = [RefInner(cfg, i, n) for i in range(n)]
    for r in range(rounds):
        cl.round(r)
        deltas = [inner.run([t.detach().clone() for t in theta], cfg.recipe.H) for inner in inners]
        assert not torch.allclose(deltas[0][0], deltas[1][0])  # different shards: different Δ_i
        for k, t in enumerate(theta):
            t.grad = sum(d[k] for d in deltas) / n
        outer.step()
        for w in cl.workers:
            assert_all_close(refs(w), [t.detach() for t in theta], atol=1e-6)
            assert_all_close(local_params(w), refs(w), atol=0, rtol=0)  # the model restarts from θ_ref


# -- ddp (spec §1): mean gradient, then one AdamW step -----------------------------------------------------

def test_ddp_equals_adamw_on_mean_gradient() -> None:
    n, rounds = 2, 4
    cfg = config("ddp", {"inner.lr": 0.05}, workers=n, rounds=rounds)
    assert cfg.recipe.inner.grad_clip is None and cfg.recipe.outer.clip_norm == 1.0  # clip once, after the mean
    cl = Cluster(cfg)
    theta = [p.detach().clone().float() for p in TASK.build_model(cfg.seed).parameters()]
    adamw = torch.optim.AdamW([{"params": [t for t in theta if t.dim() >= 2], "weight_decay": 0.1},
                               {"params": [t for t in theta if t.dim() < 2], "weight_decay": 0.0}],
                              lr=0.05, betas=(0.9, 0.95))
    inners = [RefInner(cfg, i, n) for i in range(n)]
    for r in range(rounds):
        cl.round(r)
        gs = [inner.grad([t.detach().clone() for t in theta]) for inner in inners]
        for k, t in enumerate(theta):
            t.grad = sum(g[k] for g in gs) / n
        # the toy gradients are large: the clip on the mean gradient is active
        assert float(torch.nn.utils.clip_grad_norm_(theta, 1.0)) > 1.0
        adamw.step()
        for w in cl.workers:
            assert_all_close(refs(w), [t.detach() for t in theta], atol=1e-6)
    assert len(set(cl.prints())) == 1


# -- oracle 4: sign ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_sign_one_worker_no_feedback_is_signsgd_on_delta(gamma: float) -> None:
    cfg = config("sign", {"feedback_decay": None, "outer.betas": [0.0, 0.0], "outer.weight_decay": 0.0,
                          "outer.lr": gamma, "inner.min_lr_ratio": 0.1}, workers=1, rounds=3)
    cl = Cluster(cfg)
    w = cl.workers[0]
    for r in range(3):
        before = refs(w)
        cl.train_prepare(r)
        eta = cl.lrs[0]
        delta = [b - p for b, p in zip(before, local_params(w))]
        assert all(bool((d != 0).all()) for d in delta)  # the 1-bit codec cannot send sign(0) = 0
        cl.exchange(r)
        expect = [b - gamma * eta * torch.sign(d / eta) for b, d in zip(before, delta)]
        assert_all_close(refs(w), expect, atol=1e-7, rtol=0)
    assert cl.lrs[0] < 0.01  # the cosine schedule moved η_t: γ·η_t really follows the inner lr


def test_sign_error_feedback_conservation() -> None:
    """Per worker and round: e_t = u_t − decode(own payload); over T rounds Σ sent + e_T = Σ Δ_t/η_t."""
    n, T = 2, 4
    cfg = config("sign", {"inner.min_lr_ratio": 0.1}, workers=n, rounds=T)
    cl = Cluster(cfg)
    sent_sum = [[torch.zeros_like(r) for r in w.ref] for w in cl.workers]
    x_sum = [[torch.zeros_like(r) for r in w.ref] for w in cl.workers]
    etas = set()
    for r in range(T):
        before = [refs(w) for w in cl.workers]
        prev_e = [[w.feedback.residuals.get(nm, torch.zeros_like(ref)).clone() for nm, ref in zip(w.names, w.ref)]
                  for w in cl.workers]
        cl.train_prepare(r)
        us = [[u.clone() for u in w.pending.wanted] for w in cl.workers]
        xs = [[(b - p) / eta for b, p in zip(bw, local_params(w))]
              for w, bw, eta in zip(cl.workers, before, cl.lrs)]
        sent = [decode_frame(w, f, r) for w, f in zip(cl.workers, cl.frames)]
        reports = cl.exchange(r)
        assert all(rep.committed and rep.contributed for rep in reports)
        for i, w in enumerate(cl.workers):
            etas.add(cl.lrs[i])
            e = [w.feedback.residuals[nm] for nm in w.names]
            assert_all_close(us[i], [pe + x for pe, x in zip(prev_e[i], xs[i])])  # u = e + Δ/η
            assert_all_close(e, [u - s for u, s in zip(us[i], sent[i])], atol=1e-6)  # e = u − sent
            for k in range(len(e)):
                sent_sum[i][k] += sent[i][k]
                x_sum[i][k] += xs[i][k]
            assert any(float(t.abs().max()) > 1e-3 for t in e)  # 1 bit loses something: EF is not trivial
    for i, w in enumerate(cl.workers):
        e_T = [w.feedback.residuals[nm] for nm in w.names]
        assert_all_close([s + e for s, e in zip(sent_sum[i], e_T)], x_sum[i], atol=1e-4)
    assert len(etas) > 1 and len(set(cl.prints())) == 1


# -- oracle 6: dct with everything sent is diloco with μ = β ---------------------------------------------

def test_dct_one_worker_all_coefficients_equals_diloco() -> None:
    rounds = 3
    faithful = Cluster(config("dct", BLOCK_ALL, workers=1, rounds=rounds))
    dil = Cluster(config("diloco", {"outer.momentum": 0.95}, workers=1, rounds=rounds))
    start = refs(faithful.workers[0])
    for r in range(rounds):
        faithful.round(r)
        dil.round(r)
        assert_all_close(refs(faithful.workers[0]), refs(dil.workers[0]), atol=1e-5)
    assert not torch.allclose(refs(faithful.workers[0])[0], start[0], atol=1e-3)


# -- oracle 7: dct drift comes only from the local Δ -------------------------------------------------------

def test_dct_several_workers_drift_is_local_delta() -> None:
    n = 3
    cl = Cluster(config("dct", BLOCK_ALL, workers=n, rounds=1))
    theta0 = refs(cl.workers[0])
    cl.train_prepare(0)
    deltas = [[t - p for t, p in zip(theta0, local_params(w))] for w in cl.workers]
    cl.exchange(0)
    after = [refs(w) for w in cl.workers]
    for i in range(n):
        for j in range(n):
            if i != j:
                assert_all_close([a - b for a, b in zip(after[i], after[j])],
                                 [-0.7 * (di - dj) for di, dj in zip(deltas[i], deltas[j])], atol=1e-6)
        mean = [sum(d[k] for d in deltas) / n for k in range(len(theta0))]
        # θ_i = θ_ref − η_out(Δ_i + β·Q) with Q = Δ̄ (every coefficient sent, buffers started at zero)
        assert_all_close(after[i], [t - 0.7 * (d + 0.95 * m) for t, d, m in zip(theta0, deltas[i], mean)], atol=1e-6)
    assert len(set(cl.prints())) == n
    assert not any(w.replica_consistent for w in cl.workers)


# -- oracle 8: demo with everything sent is signSGD on the mean gradient ---------------------------------

def test_demo_all_coefficients_is_sign_of_mean_gradient_and_beta_has_no_effect() -> None:
    n, rounds = 3, 2
    a = Cluster(config("demo", {**BLOCK_ALL, "feedback_decay": 0.999}, workers=n, rounds=rounds))
    b = Cluster(config("demo", {**BLOCK_ALL, "feedback_decay": 0.5}, workers=n, rounds=rounds))
    inners = [RefInner(a.cfg, i, n) for i in range(n)]
    for r in range(rounds):
        theta = refs(a.workers[0])
        a.round(r)
        b.round(r)
        gs = [inner.grad(theta) for inner in inners]
        eta = a.lrs[0]
        assert eta == pytest.approx(0.01)
        for k in range(len(theta)):
            gbar = sum(g[k] for g in gs) / n
            assert float(gbar.abs().min()) > 1e-4  # no coordinate so close to 0 that fp noise flips its sign
            for w in a.workers + b.workers:
                torch.testing.assert_close(w.ref[k], theta[k] - eta * torch.sign(gbar), atol=1e-7, rtol=0)
        assert len(set(a.prints() + b.prints())) == 1  # β has no effect, replicas identical


# -- oracle 10: the DeMo / DCT error-feedback identity ---------------------------------------------------

@pytest.mark.parametrize("recipe", ["demo", "dct-consistent", "dct"])
def test_dct_feedback_identity(recipe: str) -> None:
    """δ_after_subtract + q = β·δ_before + x, with x = Δ (dct) or η·g (demo) and q this worker's own payload."""
    n, rounds = 2, 3
    cfg = config(recipe, {"codec.k": 2}, workers=n, rounds=rounds)
    beta = cfg.recipe.feedback_decay
    cl = Cluster(cfg)
    for r in range(rounds):
        before = [refs(w) for w in cl.workers]
        deltas_before = [[w.feedback.residuals.get(nm, torch.zeros_like(ref)).clone()
                          for nm, ref in zip(w.names, w.ref)] for w in cl.workers]
        cl.train_prepare(r)
        if recipe == "demo":
            xs = [[cl.lrs[i] * g for g in grads(w)] for i, w in enumerate(cl.workers)]
        else:
            xs = [[b - p for b, p in zip(bw, local_params(w))] for w, bw in zip(cl.workers, before)]
        qs = [decode_frame(w, f, r) for w, f in zip(cl.workers, cl.frames)]
        agg = aggregate(cl.workers[0], cl.frames, r)
        cl.exchange(r)
        for i, w in enumerate(cl.workers):
            after = [w.feedback.residuals[nm].clone() for nm in w.names]
            if recipe == "dct":  # the faithful outer step then absorbs Q into the same buffer: δ ← δ + Q
                after = [t - q for t, q in zip(after, agg)]
            assert_all_close([t + q for t, q in zip(after, qs[i])],
                             [beta * d + x for d, x in zip(deltas_before[i], xs[i])], atol=1e-6)
            # k = 2 of a larger block: the residual is far from zero
            assert float(after[0].abs().max()) > 1e-2 * float(xs[i][0].abs().max())


def test_selector_mean_through_worker() -> None:
    """Oracle 9 at the round level: dct-consistent, k = 3 per block, two workers. A coefficient picked by
    one worker aggregates to its own value, one picked by both to their mean."""
    k_kept = 3
    cl = Cluster(config("dct-consistent", {"codec.k": k_kept, "codec.values": "f32"}, workers=2, rounds=1))
    theta0 = refs(cl.workers[0])
    frames = cl.train_prepare(0)
    qs = [decode_frame(w, f, 0) for w, f in zip(cl.workers, frames)]
    cl.exchange(0)
    single = 0
    for k in range(len(theta0)):
        plan = dct.plan_blocks(tuple(theta0[k].shape), 64)
        total = picks = None
        for q in qs:
            # own decode is IDCT(scatter(own top-k)); back in the coefficient domain the picks stand out
            c = dct.forward(q[k], plan)
            idx = c.abs().topk(k_kept, dim=1).indices
            v = c.gather(1, idx)
            total = (torch.zeros_like(c) if total is None else total).scatter_add_(1, idx, v)
            picks = (torch.zeros_like(c) if picks is None else picks).scatter_add_(1, idx, torch.ones_like(v))
        single += int((picks == 1).sum())
        expect = theta0[k] - 0.7 * dct.inverse(total / picks.clamp_min(1), plan)
        for w in cl.workers:
            torch.testing.assert_close(w.ref[k], expect, atol=1e-6, rtol=1e-5)
    assert single > 0  # some coefficients were picked by one worker only (else this is plain mean)


# -- oracle 13: replica identity --------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["dsm", "sign", "diloco", "dct-consistent", "demo", "ddp"])
def test_replica_identity(recipe: str) -> None:
    cl = Cluster(config(recipe, workers=3, rounds=3))
    assert all(w.replica_consistent for w in cl.workers)
    start = cl.prints()
    for r in range(3):
        cl.train_prepare(r)
        if cl.workers[0].inner.optimizer is not None:  # the local models really differ before the exchange
            locals_ = [local_params(w)[0] for w in cl.workers]
            assert not torch.equal(locals_[0], locals_[1])
        reports = cl.exchange(r)
        assert all(rep.committed and rep.members == ("w0", "w1", "w2") for rep in reports)
        prints = cl.prints()
        assert len(set(prints)) == 1, prints
        for w in cl.workers:
            assert_all_close(local_params(w), refs(w), atol=0, rtol=0)
    assert prints != start


def test_faithful_dct_replicas_drift() -> None:
    cl = Cluster(config("dct", workers=3, rounds=3))
    assert not any(w.replica_consistent for w in cl.workers)
    for r in range(3):
        cl.round(r)
        assert len(set(cl.prints())) == 3


# -- round outcomes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["sign", "dct-consistent", "diloco"])
def test_round_committed_without_a_worker(recipe: str) -> None:
    cl = Cluster(config(recipe, workers=3, rounds=3))
    cl.round(0)
    cl.train_prepare(1)
    wanted = [[u.clone() for u in w.pending.wanted] for w in cl.workers]
    reports = cl.exchange(1, skip=("w2",))
    assert all(rep.committed and rep.members == ("w0", "w1") for rep in reports)
    assert [rep.contributed for rep in reports] == [True, True, False]
    assert len(set(cl.prints())) == 1  # w2 applied the others' aggregate: replicas stay identical
    w2 = cl.workers[2]
    if cl.cfg.recipe.feedback_decay is not None:
        assert_all_close([w2.feedback.residuals[nm] for nm in w2.names], wanted[2], atol=0, rtol=0)  # kept all of u
        w0 = cl.workers[0]
        assert not torch.equal(w0.feedback.residuals[w0.names[0]], wanted[0][0])  # contributors kept only u − sent
        # next round: the kept update is added back before encoding
        kept = [w2.feedback.residuals[nm].clone() for nm in w2.names]
        before = refs(w2)
        cl.train_prepare(2)
        scale = 1.0 / cl.lrs[2] if cl.cfg.recipe.payload_scale == "inverse_inner_lr" else 1.0
        x = [(b - p) * scale for b, p in zip(before, local_params(w2))]
        decay = cl.cfg.recipe.feedback_decay
        assert_all_close(w2.pending.wanted, [decay * e + xi for e, xi in zip(kept, x)])
        reports = cl.exchange(2)
        assert all(rep.contributed for rep in reports)
        assert len(set(cl.prints())) == 1


@pytest.mark.parametrize("recipe", ["sign", "diloco"])
def test_round_not_committed_changes_nothing(recipe: str) -> None:
    cl = Cluster(config(recipe, workers=3, rounds=3), min_members=3)
    cl.round(0, skip=())  # all three: commits
    ref0 = [refs(w) for w in cl.workers]
    res0 = [w.feedback.state_dict() for w in cl.workers]
    cl.train_prepare(1)
    trained = [local_params(w) for w in cl.workers]
    reports = cl.exchange(1, skip=("w2",))
    assert all(not rep.committed and not rep.contributed for rep in reports)
    for i, w in enumerate(cl.workers):
        assert_all_close(refs(w), ref0[i], atol=0, rtol=0)
        assert_all_close(local_params(w), trained[i], atol=0, rtol=0)  # the model keeps training from here
        state = w.feedback.state_dict()
        assert state.keys() == res0[i].keys()
        assert all(torch.equal(state[k], res0[i][k]) for k in state)
    # the next round's Δ covers both rounds of local work
    before = refs(cl.workers[0])
    cl.train_prepare(2)
    assert_all_close(cl.workers[0].pending.deltas, [b - p for b, p in zip(before, local_params(cl.workers[0]))],
                     atol=0, rtol=0)
    reports = cl.exchange(2)
    assert all(rep.committed for rep in reports)
    assert len(set(cl.prints())) == 1


@pytest.mark.parametrize("recipe", ["sign", "diloco", "dct-consistent"])
def test_corrupted_frame_is_rejected_by_everyone(recipe: str) -> None:
    cl = Cluster(config(recipe, workers=3, rounds=1))
    frames = cl.train_prepare(0)
    bad = bytearray(frames[1])
    bad[len(bad) // 2] ^= 0x40
    reports = cl.exchange(0, replace={"w1": bytes(bad)})
    for rep in reports:
        assert rep.committed
        assert rep.members == ("w0", "w2")
        assert set(rep.rejected) == {"w1"} and "digest" in rep.rejected["w1"]
    assert [rep.contributed for rep in reports] == [True, False, True]
    assert len(set(cl.prints())) == 1
    # everyone applied exactly the aggregate of w0 and w2
    expect = Cluster(config(recipe, workers=3, rounds=1))
    expect.train_prepare(0)
    expect.exchange(0, skip=("w1",))
    assert cl.prints()[0] == expect.prints()[0]


def test_frame_claiming_another_sender_is_rejected() -> None:
    cl = Cluster(config("diloco", workers=3, rounds=1))
    frames = cl.train_prepare(0)
    reports = cl.exchange(0, replace={"w2": frames[0]})  # w2 forwards w0's frame as its own
    for rep in reports:
        assert rep.members == ("w0", "w1") and "w2" in rep.rejected and "sender" in rep.rejected["w2"]
    assert len(set(cl.prints())) == 1


# -- config validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe,overrides,match", [
    ("ddp", {"H": 4}, "H must be 1"),
    ("demo", {"H": 2}, "H must be 1"),
    ("dct", {"feedback_decay": 0.9}, "feedback_decay"),
    ("dct", {"feedback_decay": None}, "feedback_decay"),
    ("dct", {"outer.momentum": 0.9}, "outer.momentum"),
    ("sign", {"codec.bogus": 1}, "bogus"),
    ("dct", {"codec.values": "f64"}, "values"),
    ("diloco", {"outer.nesterov": True}, "bad parameters"),
    ("diloco", {"inner.bogus": 1}, "unknown setting 'inner.bogus'"),
    ("diloco", {"bogus": 1}, "unknown setting 'bogus'"),
    ("diloco", {"H": 0}, "H must be"),
    ("sign", {"inner.min_lr_ratio": 0.0}, "min_lr_ratio"),
    ("diloco", {"inner.optimizer": "lion"}, "inner.optimizer"),
])
def test_invalid_configs_raise_config_error(recipe: str, overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_run_config(recipe, overrides)


def test_unknown_recipe() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'dilco'"):
        make_run_config("dilco")


@pytest.mark.parametrize("overrides", [{"feedback_decay": 0.9, "outer.momentum": 0.9},
                                       {"outer.momentum": 0.9, "feedback_decay": 0.9}])
def test_dct_feedback_and_momentum_changed_together_is_valid(overrides: dict) -> None:
    """Coupled settings are validated on the final combination, in either order."""
    cfg = make_run_config("dct", overrides)
    assert cfg.recipe.feedback_decay == 0.9 and cfg.recipe.outer.params["momentum"] == 0.9


def test_config_type_error_becomes_config_error() -> None:
    with pytest.raises(ConfigError, match="H must be an integer"):
        make_run_config("diloco", {"H": "many"})
    with pytest.raises(ConfigError, match="malformed field"):
        make_run_config("diloco", {"inner.betas": 3})
