"""Outer optimizers against their update rules (docs/algorithms.md, §3) and oracles 1, 2, 3 and 5
(docs/algorithms.md, §8), fp64.

Pure optimizer math on small random tensors: no network, no model, no codec.
"""
from __future__ import annotations

import pytest
import torch

from node.errors import ConfigError
from node.outer import (DecoupledNesterov, NesterovSGD, SignMomentum, SignSGD, is_replica_consistent,
                        make_outer)

DT = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


def _grads(steps: int, shapes: list[tuple[int, ...]], seed: int = 1) -> list[list[torch.Tensor]]:
    """A fixed sequence of per-step gradients, one per tensor shape."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=g, dtype=DT) for s in shapes] for _ in range(steps)]


SHAPES = [(5, 3), (7,), (2, 3, 4)]


def _params(seed: int = 0) -> list[torch.Tensor]:
    return [_rand(*s, seed=seed + i) for i, s in enumerate(SHAPES)]


def _step_with(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


# -- oracle 5: Nesterov SGD is torch's SGD(nesterov=True) ---------------------------------------------------

def test_nesterov_equals_torch_sgd_nesterov() -> None:
    ours, ref = _params(), _params()
    opt = NesterovSGD(ours, lr=0.7, momentum=0.9)
    torch_opt = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=True)
    for grads in _grads(5, SHAPES):
        _step_with(opt, ours, grads)
        _step_with(torch_opt, ref, grads)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch_opt.state[q]["momentum_buffer"],
                                   atol=1e-12, rtol=0)


def test_nesterov_hand_formula_first_two_steps() -> None:
    """b starts at g; θ ← θ − lr·(g + μ·b) (docs/algorithms.md, §3 diloco), written out by hand."""
    x0 = _rand(6, seed=3)
    g1, g2 = _rand(6, seed=4), _rand(6, seed=5)
    p = x0.clone()
    opt = NesterovSGD([p], lr=0.7, momentum=0.9)
    _step_with(opt, [p], [g1])
    b = g1.clone()
    x1 = x0 - 0.7 * (g1 + 0.9 * b)
    torch.testing.assert_close(p, x1, atol=1e-12, rtol=0)
    _step_with(opt, [p], [g2])
    b = 0.9 * b + g2
    torch.testing.assert_close(p, x1 - 0.7 * (g2 + 0.9 * b), atol=1e-12, rtol=0)


def test_nesterov_zero_momentum_is_plain_sgd() -> None:
    ours = _params()
    start = [p.clone() for p in ours]
    opt = NesterovSGD(ours, lr=0.7, momentum=0.0)
    expect = [p.clone() for p in start]
    for grads in _grads(3, SHAPES):
        _step_with(opt, ours, grads)
        expect = [e - 0.7 * g for e, g in zip(expect, grads)]
        for a, b in zip(ours, expect):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert all("momentum_buffer" not in opt.state[p] for p in ours)


def test_nesterov_skips_params_without_grad() -> None:
    a, b = _rand(4, seed=1), _rand(4, seed=2)
    b0 = b.clone()
    opt = NesterovSGD([a, b], lr=0.7, momentum=0.9)
    a.grad = _rand(4, seed=3)
    opt.step()
    assert torch.equal(b, b0)


# -- oracle 1: sign momentum is Lion ---------------------------------------------------------------------

def _lion_reference(params: list[torch.Tensor], grads_seq: list[list[torch.Tensor]], lr: float, b1: float,
                    b2: float, wd: float) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Hand-written Lion (Chen et al. 2023): returns (params, momentum) after every step."""
    x = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    out = []
    for grads in grads_seq:
        for i, g in enumerate(grads):
            c = b1 * m[i] + (1 - b1) * g
            x[i] = x[i] * (1 - lr * wd) - lr * torch.sign(c)
            m[i] = b2 * m[i] + (1 - b2) * g
        out.append(([t.clone() for t in x], [t.clone() for t in m]))
    return out


@pytest.mark.parametrize("b1,b2,wd", [(0.95, 0.98, 0.1), (0.9, 0.99, 0.0), (0.5, 0.5, 0.2)])
def test_sign_momentum_equals_lion(b1: float, b2: float, wd: float) -> None:
    lr = 0.01
    ours = _params()
    start = [p.clone() for p in ours]
    seq = _grads(6, SHAPES, seed=7)
    opt = SignMomentum(ours, lr=lr, betas=(b1, b2), weight_decay=wd)
    ref = _lion_reference(start, seq, lr, b1, b2, wd)
    for grads, (x_ref, m_ref) in zip(seq, ref):
        _step_with(opt, ours, grads)
        for p, xr, mr in zip(ours, x_ref, m_ref):
            torch.testing.assert_close(p, xr, atol=1e-12, rtol=0)
            torch.testing.assert_close(opt.state[p]["exp_avg"], mr, atol=1e-12, rtol=0)


def test_sign_momentum_end_to_end_is_lion_on_mean_gradient() -> None:
    """Oracle 1 at the level of the round: H = 1, inner plain SGD(η), n = 3, γ = 1 ... then also γ ≠ 1.

    Worker i: θ_i = θ_ref − η·g_i; Δ_i = θ_ref − θ_i; d = mean(Δ_i)/η. SignMomentum with lr = γ·η on d must
    equal Lion(lr = γ·η) on the mean gradient ḡ.
    """
    eta, b1, b2, wd, n = 0.03, 0.95, 0.98, 0.1, 3
    for gamma in (1.0, 0.5):
        theta = _params(seed=11)
        lion_x = [p.clone() for p in theta]
        lion_m = [torch.zeros_like(p) for p in theta]
        opt = SignMomentum(theta, lr=gamma * eta, betas=(b1, b2), weight_decay=wd)
        gen = torch.Generator().manual_seed(12)
        for _ in range(5):
            worker_grads = [[torch.randn(p.shape, generator=gen, dtype=DT) for p in theta] for _ in range(n)]
            # by hand: each worker takes one SGD step from θ_ref
            deltas_mean = []
            for k, ref in enumerate(theta):
                locals_ = [ref - eta * worker_grads[i][k] for i in range(n)]
                deltas = [ref - t for t in locals_]
                deltas_mean.append(sum(deltas) / n / eta)
            _step_with(opt, theta, deltas_mean)
            for k in range(len(theta)):
                gbar = sum(worker_grads[i][k] for i in range(n)) / n
                c = b1 * lion_m[k] + (1 - b1) * gbar
                lion_x[k] = lion_x[k] * (1 - gamma * eta * wd) - gamma * eta * torch.sign(c)
                lion_m[k] = b2 * lion_m[k] + (1 - b2) * gbar
                torch.testing.assert_close(theta[k], lion_x[k], atol=1e-12, rtol=0)
                torch.testing.assert_close(opt.state[theta[k]]["exp_avg"], lion_m[k], atol=1e-10, rtol=1e-10)


# -- oracle 2: step magnitude ------------------------------------------------------------------------------

def test_sign_momentum_step_magnitude() -> None:
    gamma, eta, wd = 1.0, 0.05, 0.1
    lr = gamma * eta
    p = _rand(200, seed=21)
    opt = SignMomentum([p], lr=lr, betas=(0.9, 0.99), weight_decay=wd)
    gen = torch.Generator().manual_seed(22)
    for step in range(4):
        d = torch.randn(200, generator=gen, dtype=DT)
        d[::17] = 0.0  # with m = 0 on step 0 these give c = 0: no sign step there
        m_before = opt.state[p]["exp_avg"].clone() if "exp_avg" in opt.state[p] else torch.zeros_like(p)
        x_old = p.clone()
        _step_with(opt, [p], [d])
        c = 0.9 * m_before + 0.1 * d
        moved = (p - (1 - wd * lr) * x_old).abs()
        nz = c != 0
        torch.testing.assert_close(moved[nz], torch.full_like(moved[nz], lr), atol=1e-12, rtol=0)
        assert torch.all(moved[~nz] <= 1e-15)
        if step == 0:
            assert int((~nz).sum()) == len(range(0, 200, 17))  # the zeros really produced c = 0


# -- oracle 3: β1 = 0 ignores m -----------------------------------------------------------------------------

def test_sign_momentum_beta1_zero_ignores_momentum() -> None:
    b2 = 0.8
    start = _rand(30, seed=31)
    d = _rand(30, seed=32)
    m_a, m_b = _rand(30, seed=33), -5 * _rand(30, seed=34)
    pa, pb = start.clone(), start.clone()
    opt_a = SignMomentum([pa], lr=0.1, betas=(0.0, b2), weight_decay=0.1)
    opt_b = SignMomentum([pb], lr=0.1, betas=(0.0, b2), weight_decay=0.1)
    opt_a.state[pa]["exp_avg"] = m_a.clone()
    opt_b.state[pb]["exp_avg"] = m_b.clone()
    _step_with(opt_a, [pa], [d])
    _step_with(opt_b, [pb], [d])
    assert torch.equal(pa, pb)
    torch.testing.assert_close(pa, start * (1 - 0.1 * 0.1) - 0.1 * torch.sign(d), atol=1e-12, rtol=0)
    # m still evolves with β2
    torch.testing.assert_close(opt_a.state[pa]["exp_avg"], b2 * m_a + (1 - b2) * d, atol=1e-12, rtol=0)
    torch.testing.assert_close(opt_b.state[pb]["exp_avg"], b2 * m_b + (1 - b2) * d, atol=1e-12, rtol=0)
    # ... and with β1 > 0 the same two states would give different steps (the test can fail)
    qa, qb = start.clone(), start.clone()
    oa = SignMomentum([qa], lr=0.1, betas=(0.9, b2))
    ob = SignMomentum([qb], lr=0.1, betas=(0.9, b2))
    oa.state[qa]["exp_avg"], ob.state[qb]["exp_avg"] = m_a.clone(), m_b.clone()
    _step_with(oa, [qa], [d])
    _step_with(ob, [qb], [d])
    assert not torch.equal(qa, qb)


def test_sign_momentum_sign_of_zero_is_zero() -> None:
    p = torch.ones(4, dtype=DT)
    opt = SignMomentum([p], lr=0.5, betas=(0.9, 0.9), weight_decay=0.0)
    _step_with(opt, [p], [torch.tensor([0.0, 1.0, -1.0, 0.0], dtype=DT)])
    assert p.tolist() == [1.0, 0.5, 1.5, 1.0]


# -- randomized sign ---------------------------------------------------------------------------------------

def test_randomized_sign_replica_consistent() -> None:
    seq = _grads(4, SHAPES, seed=41)
    a, b = _params(seed=40), _params(seed=40)
    oa = SignMomentum(a, lr=0.01, sign_mode="randomized", seed=123)
    ob = SignMomentum(b, lr=0.01, sign_mode="randomized", seed=123)
    for grads in seq:
        _step_with(oa, a, grads)
        _step_with(ob, b, grads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a different seed draws different signs (otherwise the check above proves nothing)
    c = _params(seed=40)
    oc = SignMomentum(c, lr=0.01, sign_mode="randomized", seed=124)
    for grads in seq:
        _step_with(oc, c, grads)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_randomized_sign_is_unbiased_up_to_bound() -> None:
    """E[S(c)] = c / max|c|; S(c) ∈ {−1, +1}."""
    c = torch.tensor([1.0, -0.5, 0.25, 0.0, -1.0, 0.75], dtype=DT)
    opt = SignMomentum([torch.zeros(6, dtype=DT)], sign_mode="randomized", seed=5)
    draws = torch.stack([opt._sign(c) for _ in range(4000)])
    assert set(draws.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(draws.mean(0), c / c.abs().max(), atol=0.05, rtol=0)
    # coordinates at ±B are deterministic
    assert torch.all(draws[:, 0] == 1) and torch.all(draws[:, 4] == -1)


def test_randomized_sign_step_magnitude() -> None:
    """Every coordinate moves by exactly lr (no zeros in a ±1 draw) after removing weight decay."""
    p = _rand(50, seed=51)
    x_old = p.clone()
    opt = SignMomentum([p], lr=0.02, weight_decay=0.1, sign_mode="randomized", seed=9)
    _step_with(opt, [p], [_rand(50, seed=52)])
    torch.testing.assert_close((p - (1 - 0.1 * 0.02) * x_old).abs(), torch.full((50,), 0.02, dtype=DT),
                               atol=1e-12, rtol=0)


# -- SignSGD (DeMo's step) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sign_sgd_rule(wd: float) -> None:
    ours = _params(seed=60)
    expect = [p.clone() for p in ours]
    opt = SignSGD(ours, lr=0.05, weight_decay=wd)
    for grads in _grads(3, SHAPES, seed=61):
        grads[0][0, 0] = 0.0  # sign(0) = 0: only decay there
        _step_with(opt, ours, grads)
        expect = [e * (1 - 0.05 * wd) - 0.05 * torch.sign(g) for e, g in zip(expect, grads)]
        for a, b in zip(ours, expect):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# -- DecoupledNesterov (faithful dct, arXiv 2510.03371) -----------------------------------------------------

def test_decoupled_nesterov_rule() -> None:
    lr, beta = 0.7, 0.95
    theta = _params(seed=70)
    x0 = [p.clone() for p in theta]
    opt = DecoupledNesterov(theta, lr=lr, momentum=beta)
    assert opt.replica_consistent is False and not is_replica_consistent(opt)
    deltas = [_rand(*p.shape, seed=71 + i) for i, p in enumerate(theta)]
    residuals = [_rand(*p.shape, seed=81 + i) for i, p in enumerate(theta)]
    res_before = [r.clone() for r in residuals]
    res_ids = [id(r) for r in residuals]
    q = [_rand(*p.shape, seed=91 + i) for i, p in enumerate(theta)]
    opt.set_round_context(deltas, residuals)
    _step_with(opt, theta, q)
    for k in range(len(theta)):
        # δ ← δ + Q, in place on the very tensor the trainer passed
        assert id(residuals[k]) == res_ids[k]
        torch.testing.assert_close(residuals[k], res_before[k] + q[k], atol=1e-12, rtol=0)
        torch.testing.assert_close(theta[k], x0[k] - lr * (deltas[k] + beta * (res_before[k] + q[k])),
                                   atol=1e-12, rtol=0)


def test_decoupled_nesterov_needs_context_every_round() -> None:
    p = _rand(3)
    opt = DecoupledNesterov([p])
    p.grad = _rand(3, seed=2)
    with pytest.raises(RuntimeError, match="set_round_context"):
        opt.step()
    opt.set_round_context([torch.zeros(3, dtype=DT)], [torch.zeros(3, dtype=DT)])
    opt.step()
    with pytest.raises(RuntimeError):  # the context is consumed by one step
        opt.step()


def test_decoupled_nesterov_zero_residual_matches_nesterov_first_step() -> None:
    """Round 1 with δ = 0 after sending everything: Q = Δ̄, so θ ← θ − lr(Δ + βΔ̄) (n = 1: torch Nesterov)."""
    theta, ref = [_rand(8, seed=1)], [_rand(8, seed=1)]
    delta = _rand(8, seed=2)
    opt = DecoupledNesterov(theta, lr=0.7, momentum=0.9)
    opt.set_round_context([delta], [torch.zeros(8, dtype=DT)])
    _step_with(opt, theta, [delta])
    t = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=True)
    _step_with(t, ref, [delta])
    torch.testing.assert_close(theta[0], ref[0], atol=1e-12, rtol=0)


# -- make_outer ------------------------------------------------------------------------------------------

def test_make_outer_builds_each_known_optimizer() -> None:
    named = [("w", torch.zeros(3, 2)), ("b", torch.zeros(3))]
    assert isinstance(make_outer("nesterov", named, 0.7, {"momentum": 0.9}), NesterovSGD)
    sm = make_outer("sign_momentum", named, 0.1, {"betas": [0.9, 0.99], "weight_decay": 0.0})
    assert isinstance(sm, SignMomentum) and sm.param_groups[0]["betas"] == (0.9, 0.99)
    assert isinstance(make_outer("sign_sgd", named, 1.0, {}), SignSGD)
    assert isinstance(make_outer("decoupled_nesterov", named, 0.7, {"momentum": 0.95}), DecoupledNesterov)
    adamw = make_outer("adamw", named, 1.0, {"weight_decay": 0.1})
    decays = sorted((len(g["params"]), g["weight_decay"]) for g in adamw.param_groups)
    assert decays == [(1, 0.0), (1, 0.1)]  # decay on the 2-D tensor only


@pytest.mark.parametrize("name,params,match", [
    ("nesterovv", {}, "unknown outer optimizer"),
    ("nesterov", {"momentum": 1.5}, "nesterov"),
    ("nesterov", {"nesterov": True}, "bad parameters"),
    ("sign_momentum", {"betas": [0.9, 1.5]}, "sign_momentum"),
    ("sign_momentum", {"sign_mode": "stochastic"}, "sign_mode"),
    ("sign_sgd", {"weight_decay": -1.0}, "sign_sgd"),
    ("decoupled_nesterov", {"momentum": 2.0}, "decoupled_nesterov"),
    ("adamw", {"bogus": 1}, "bad parameters"),
])
def test_make_outer_rejects_bad_config(name: str, params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_outer(name, [("w", torch.zeros(2))], 0.7, params)


def test_make_outer_rejects_negative_lr() -> None:
    with pytest.raises(ConfigError):
        make_outer("sign_momentum", [("w", torch.zeros(2))], -1.0, {})
