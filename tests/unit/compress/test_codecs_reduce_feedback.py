"""Every codec's reduce semantics (sign mean/vote, DCT selector-mean — oracle 9) and error feedback
(oracles 4 and 10; numbering: docs/algorithms.md, §8). Tables and helpers: codecs_harness.py."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from codecs_harness import SMALL_CONFIGS, SMALL_IDS, _sign_expected, _x
from node.compress import ErrorFeedback, NoFeedback, make_codec, make_feedback
from node.compress import dct
from node.compress.bitpack import pack_uints, unpack_uints


# -- sign reduce: mean and vote -------------------------------------------------------------------------

@pytest.mark.parametrize("block", [0, 100])
def test_sign_reduce_mean_is_mean_of_decodes(block: int) -> None:
    shape = (256, 128)
    codec = make_codec("sign", dict(block=block, reduce="mean"))
    encs = [codec.encode(_x(shape, seed=s) * (s + 1)) for s in range(3)]
    want = sum(codec.decode(e, shape) for e in encs) / 3
    torch.testing.assert_close(codec.reduce(encs, shape), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block", [0, 100])
@pytest.mark.parametrize("scale_dtype", ["f32", "f16"])
def test_sign_reduce_vote(block: int, scale_dtype: str) -> None:
    shape = (97, 29)
    codec = make_codec("sign", dict(block=block, scale_dtype=scale_dtype, reduce="vote"))
    xs = [_x(shape, seed=s) * (s + 1) for s in range(3)]
    encs = [codec.encode(x) for x in xs]
    signs = [torch.where(x >= 0, 1.0, -1.0) for x in xs]
    majority = torch.sign(sum(signs))
    scales = [_sign_expected(x, block, scale_dtype)[0].abs() for x in xs]  # per-element scale of each worker
    want = majority * (sum(scales) / 3)
    out = codec.reduce(encs, shape)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    assert bool((out != 0).all())  # three voters never tie


def test_sign_vote_ties_give_zero_and_mean_differs() -> None:
    shape = (64,)
    x = _x(shape, seed=7)
    x[x == 0] = 1.0
    vote = make_codec("sign", dict(reduce="vote"))
    out = vote.reduce([vote.encode(x), vote.encode(-x)], shape)
    assert torch.equal(out, torch.zeros(shape))
    # two of three agree: the majority sign with the mean of all three scales
    y = x.abs() * 3
    out3 = vote.reduce([vote.encode(x), vote.encode(-x), vote.encode(y)], shape)
    mean_scale = (2 * x.abs().mean() + y.abs().mean()) / 3
    torch.testing.assert_close(out3, torch.full(shape, float(mean_scale)), rtol=1e-6, atol=0)
    # 'mean' instead: x and −x cancel exactly, leaving y's scale over three workers
    mean = make_codec("sign", dict(reduce="mean"))
    m = mean.reduce([mean.encode(x), mean.encode(-x), mean.encode(y)], shape)
    torch.testing.assert_close(m, torch.full(shape, float(y.mean()) / 3), rtol=1e-6, atol=1e-7)


# -- reduce: single payload and selector-mean (oracle 9) ---------------------------------------------

@pytest.mark.parametrize("name,params", SMALL_CONFIGS, ids=SMALL_IDS)
def test_reduce_of_one_payload_is_its_decode(name: str, params: dict[str, Any]) -> None:
    shape = (97, 29)
    codec = make_codec(name, params)
    enc = codec.encode(_x(shape, seed=8))
    torch.testing.assert_close(codec.reduce([enc], shape), codec.decode(enc, shape), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        codec.reduce([], shape)


def _spiky(coeffs: dict[int, float], n: int = 64) -> torch.Tensor:
    """A 1-D tensor whose DCT (one chunk of n) is exactly these coefficients."""
    c = torch.zeros(1, n, dtype=torch.float64)
    for i, v in coeffs.items():
        c[0, i] = v
    return dct.inverse(c, dct.plan_blocks((n,), 64)).float()


@pytest.mark.parametrize("values", ["f32", "f16", "bf16"])
def test_selector_mean_single_picker_keeps_its_value(values: str) -> None:
    shape = (64,)
    plan = dct.plan_blocks(shape, 64)
    a = _spiky({3: 5.0, 10: -4.0})
    b = _spiky({3: 1.0, 20: 2.0})
    sel = make_codec("dct_topk", dict(k=2, values=values, reduce="selector-mean"))
    ea, eb = sel.encode(a), sel.encode(b)
    assert unpack_uints(ea["indices"], 2, 6).tolist() == [3, 10]
    assert unpack_uints(eb["indices"], 2, 6).tolist() == [3, 20]
    tol = dict(atol=1e-4, rtol=1e-2 if values == "bf16" else 1e-3)
    q = dct.forward(sel.reduce([ea, eb], shape), plan)[0]
    torch.testing.assert_close(q[10], torch.tensor(-4.0), **tol)  # picked by a only: a's value, not half
    torch.testing.assert_close(q[20], torch.tensor(2.0), **tol)   # picked by b only
    torch.testing.assert_close(q[3], torch.tensor(3.0), **tol)    # picked by both: their mean
    others = torch.ones(64, dtype=torch.bool)
    others[[3, 10, 20]] = False
    assert float(q[others].abs().max()) < 1e-4
    # the order of payloads does not change the result
    torch.testing.assert_close(sel.reduce([eb, ea], shape), sel.reduce([ea, eb], shape), atol=1e-6, rtol=0)

    mean = make_codec("dct_topk", dict(k=2, values=values, reduce="mean"))
    qm = dct.forward(mean.reduce([mean.encode(a), mean.encode(b)], shape), plan)[0]
    torch.testing.assert_close(qm[10], torch.tensor(-2.0), **tol)  # divided by all workers
    torch.testing.assert_close(qm[20], torch.tensor(1.0), **tol)
    torch.testing.assert_close(qm[3], torch.tensor(3.0), **tol)


def test_selector_mean_with_handcrafted_2d_payloads() -> None:
    shape = (8, 8)  # one 8×8 block: 64 coefficients, 6-bit indices
    plan = dct.plan_blocks(shape, 8)
    codec = make_codec("dct_topk", dict(k=2, chunk=8, values="f32", reduce="selector-mean"))

    def payload(idx: list[int], vals: list[float]) -> dict[str, torch.Tensor]:
        enc = {"indices": pack_uints(torch.tensor(idx), 6), "values": torch.tensor(vals, dtype=torch.float32)}
        codec.validate(enc, shape)
        return enc

    p1, p2, p3 = payload([1, 9], [2.0, 3.0]), payload([9, 40], [5.0, -1.0]), payload([9, 63], [7.0, 0.5])
    q = dct.forward(codec.reduce([p1, p2, p3], shape), plan).view(-1)
    expect = torch.zeros(64)
    expect[1], expect[9], expect[40], expect[63] = 2.0, 5.0, -1.0, 0.5
    torch.testing.assert_close(q, expect, atol=1e-5, rtol=0)
    q2 = dct.forward(codec.reduce([p1, p2], shape), plan).view(-1)
    expect2 = torch.zeros(64)
    expect2[1], expect2[9], expect2[40] = 2.0, 4.0, -1.0
    torch.testing.assert_close(q2, expect2, atol=1e-5, rtol=0)
    # 'mean' divides every coefficient by the number of workers
    mean = make_codec("dct_topk", dict(k=2, chunk=8, values="f32", reduce="mean"))
    qm = dct.forward(mean.reduce([p1, p2, p3], shape), plan).view(-1)
    torch.testing.assert_close(qm, torch.zeros(64).index_put_(
        (torch.tensor([1, 9, 40, 63]),), torch.tensor([2.0, 15.0, -1.0, 0.5]) / 3), atol=1e-5, rtol=0)


def test_selector_mean_equals_mean_when_everything_is_sent() -> None:
    shape = (96, 16)
    sel = make_codec("dct_topk", dict(k=4096, values="f32", reduce="selector-mean"))
    mean = make_codec("dct_topk", dict(k=4096, values="f32", reduce="mean"))
    xs = [_x(shape, seed=s) for s in range(3)]
    want = sum(xs) / 3
    torch.testing.assert_close(sel.reduce([sel.encode(x) for x in xs], shape), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean.reduce([mean.encode(x) for x in xs], shape), want, atol=1e-5, rtol=1e-5)


# -- error feedback (oracles 4 and 10) -------------------------------------------------------------------

FEEDBACK_CODECS = [("sign", dict(block=0)), ("sign", dict(block=100, scale_dtype="f16")),
                   ("dct_topk", dict(k=4, chunk=64, values="f32")), ("dct_topk", dict(k=32, values="f16")),
                   ("dct_topk", dict(k=8, values="int8")), ("dct_topk", dict(k=8, values="sign"))]


@pytest.mark.parametrize("name,params", FEEDBACK_CODECS, ids=str)
def test_error_feedback_conserves_everything(name: str, params: dict[str, Any]) -> None:
    shape = (96, 16)
    codec = make_codec(name, params)
    ef = ErrorFeedback(1.0)
    sent_total = torch.zeros(shape)
    x_total = torch.zeros(shape)
    for t in range(5):
        x = _x(shape, seed=10 + t)
        u = ef.compensate("w", x)
        sent = codec.decode(codec.encode(u), shape)
        ef.commit("w", u, sent)
        sent_total += sent
        x_total += x
        assert not torch.equal(ef.residuals["w"], torch.zeros(shape))  # the codec is lossy here
    torch.testing.assert_close(sent_total + ef.residuals["w"], x_total, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("name,params", FEEDBACK_CODECS[:3], ids=str)
def test_error_feedback_with_decay(name: str, params: dict[str, Any], beta: float) -> None:
    shape = (64, 8)
    codec = make_codec(name, params)
    ef = ErrorFeedback(beta)
    e_before = torch.zeros(shape)
    for t in range(4):
        x = _x(shape, seed=20 + t)
        u = ef.compensate("w", x)
        torch.testing.assert_close(u, beta * e_before + x, atol=1e-6, rtol=0)
        sent = codec.decode(codec.encode(u), shape)
        ef.commit("w", u, sent)
        e_after = ef.residuals["w"]
        torch.testing.assert_close(e_after + sent, beta * e_before + x, atol=1e-5, rtol=0)
        e_before = e_after.clone()


def test_compensate_does_not_alias_state() -> None:
    ef = ErrorFeedback(0.5)
    x = torch.ones(4)
    u = ef.compensate("a", x)
    u.add_(1.0)
    assert torch.equal(x, torch.ones(4))  # first round: u is a copy of x
    ef.commit("a", u, torch.zeros(4))
    residual = ef.residuals["a"].clone()
    u2 = ef.compensate("a", x)
    assert torch.equal(ef.residuals["a"], residual)  # compensate leaves the residual alone
    torch.testing.assert_close(u2, 0.5 * residual + x)
    assert "b" not in ef.residuals and torch.equal(ef.compensate("b", x), x)  # tensors are independent


def test_keep_retains_all_of_u() -> None:
    ef = ErrorFeedback(0.9)
    u = torch.arange(6, dtype=torch.float32)
    ef.keep("w", u)
    u.mul_(0)  # the kept copy is independent of the caller's tensor
    assert torch.equal(ef.residuals["w"], torch.arange(6, dtype=torch.float32))
    x = torch.ones(6)
    torch.testing.assert_close(ef.compensate("w", x), 0.9 * torch.arange(6, dtype=torch.float32) + x)
    # a missed round followed by a transmitted one still conserves with decay 1
    ef1 = ErrorFeedback(1.0)
    codec = make_codec("sign")
    x1, x2 = _x((32,), seed=1), _x((32,), seed=2)
    u1 = ef1.compensate("w", x1)
    ef1.keep("w", u1)
    u2 = ef1.compensate("w", x2)
    sent = codec.decode(codec.encode(u2), (32,))
    ef1.commit("w", u2, sent)
    torch.testing.assert_close(sent + ef1.residuals["w"], x1 + x2, atol=1e-6, rtol=0)


def test_no_feedback_keeps_nothing() -> None:
    nf = NoFeedback()
    codec = make_codec("sign")
    x = _x((32,), seed=3)
    for _ in range(3):
        u = nf.compensate("w", x)
        assert torch.equal(u, x)
        nf.commit("w", u, codec.decode(codec.encode(u), (32,)))
        nf.keep("w", u)
    assert nf.residuals == {} and nf.state_dict() == {}


def test_feedback_state_dict_round_trip_and_factory() -> None:
    ef = ErrorFeedback(1.0)
    ef.commit("a", torch.ones(3), torch.zeros(3))
    state = ef.state_dict()
    state["a"].zero_()  # a copy
    assert torch.equal(ef.residuals["a"], torch.ones(3))
    other = ErrorFeedback(1.0)
    other.load_state_dict(ef.state_dict())
    assert torch.equal(other.residuals["a"], torch.ones(3))
    assert isinstance(make_feedback(None), NoFeedback)
    fb = make_feedback(0.9)
    assert type(fb) is ErrorFeedback and fb.decay == 0.9
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            ErrorFeedback(bad)
