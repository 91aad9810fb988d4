"""Every tensor a torch model can hold, through every codec (issue 15, input 6; docs/algorithms.md §5, range):
property tests over shapes (empty, scalar, 1-D, 2-D, >2-D, primes) and magnitudes from fp32's smallest subnormal
to its largest finite value. No codec ever puts ±inf or a value receivers refuse on the wire: what its wire type
cannot carry is saturated, and error feedback keeps the rest; reduce and the residual stay finite. Start-up refuses
what cannot be represented at all, naming the tensor. Configurations: codecs_harness.py."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from node.compress import make_codec
from node.compress.base import MAX_MAGNITUDE, WIRE_LIMIT
from node.compress.feedback import ErrorFeedback
from node.config import TaskConfig
from node.errors import ConfigError
from node.recipes import make_run_config
from node.train.reference import Reference
from codecs_harness import CONFIGS, CONFIG_IDS

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPARSE = [("sparse_topk", dict(k=k, chunk=c, bits=b, reduce=r))
          for k, c, b, r in ((4, 16, 2, "mean"), (64, 4096, 1, "selector-mean"), (3, 5, 8, "mean"))]
REPRESENTATIVE = ([(n, p) for n, p in CONFIGS if n != "dct_topk" or (p["k"], p["chunk"]) in ((32, 64), (4096, 10))]
                  + SPARSE)
REP_IDS = [CONFIG_IDS[CONFIGS.index(c)] if c in CONFIGS else "sparse_topk-" + "-".join(map(str, c[1].values()))
           for c in REPRESENTATIVE]

shapes = st.one_of(st.just(()), st.lists(st.integers(0, 70), min_size=1, max_size=1).map(tuple),
                   st.lists(st.integers(1, 19), min_size=2, max_size=3).map(tuple))


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of any of those shapes whose magnitudes span a drawn range of decades within fp32's (1e-45 .. 3.4e38),
    with zeros and both signs."""
    shape = draw(shapes)
    lo = draw(st.integers(-45, 38))
    hi = draw(st.integers(lo, 38))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    exponents = torch.randint(lo, hi + 1, (n,), generator=g).double()
    mant = torch.rand(n, generator=g, dtype=torch.float64) * 9 + 1
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    x = (sign * mant * 10.0 ** exponents).clamp(-3.4e38, 3.4e38).float()
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    return x.reshape(shape)


def _on_the_wire_ok(codec, enc, shape) -> None:  # type: ignore[no-untyped-def]
    codec.validate(enc, shape)  # what every receiver runs: finite, within ±MAX_MAGNITUDE, the codec's own rules
    for key, buf in enc.items():
        if buf.is_floating_point() and buf.numel():
            assert bool(torch.isfinite(buf).all()), key
            assert float(buf.abs().max()) <= MAX_MAGNITUDE


@pytest.mark.parametrize("name, params", REPRESENTATIVE, ids=REP_IDS)
@PROPERTY
@given(x=tensors())
def test_no_codec_sends_inf_or_a_value_receivers_refuse(name: str, params: dict, x: torch.Tensor) -> None:
    codec = make_codec(name, params)
    shape = tuple(x.shape)
    enc = codec.encode(codec.fit(x))
    assert {k: (b.dtype, b.numel()) for k, b in enc.items()} == {k: (s.dtype, s.numel) for k, s in codec.layout(shape).items()}
    _on_the_wire_ok(codec, enc, shape)
    out = codec.decode(enc, shape)
    assert tuple(out.shape) == shape and bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(codec.reduce([enc, enc, codec.encode(codec.fit(-x))], shape)).all())


@pytest.mark.parametrize("name, params", REPRESENTATIVE, ids=REP_IDS)
@PROPERTY
@given(x=tensors(), y=tensors())
def test_error_feedback_keeps_what_saturation_cut_and_stays_finite(name: str, params: dict, x: torch.Tensor,
                                                                   y: torch.Tensor) -> None:
    codec = make_codec(name, params)
    shape = tuple(x.shape)
    fb = ErrorFeedback(1.0)
    for step in (x, x * 0.5):
        u = fb.compensate("t", step)
        if not bool(torch.isfinite(u).all()):  # two values near fp32's limit summed: the worker drops the residual
            fb.residuals.clear()
            u = fb.compensate("t", step)
        enc = codec.encode(codec.fit(u))
        _on_the_wire_ok(codec, enc, shape)
        fb.commit("t", u, codec.decode(enc, shape))
        assert bool(torch.isfinite(fb.residuals["t"]).all())


@pytest.mark.parametrize("name, params", [("identity", {}), ("bf16", {}), ("fp16", {})], ids=str)
@PROPERTY
@given(x=tensors())
def test_dense_codecs_carry_every_in_range_value_exactly_as_their_type(name: str, params: dict,
                                                                       x: torch.Tensor) -> None:
    codec = make_codec(name, params)
    limit = WIRE_LIMIT[codec.wire_dtype]
    out = codec.decode(codec.encode(codec.fit(x)), tuple(x.shape))
    inside = x.abs() <= limit
    assert torch.equal(out[inside], x[inside].to(codec.wire_dtype).float())
    assert bool((out[~inside].abs() <= limit).all())


def test_dct_topk_f16_saturates_a_coefficient_above_65504_instead_of_sending_inf() -> None:
    """The issue's input: before, the coefficient became inf, receivers refused the frame and the sender's residual
    went non-finite. Now it is 65504 on the wire, and the rest stays in the residual."""
    codec = make_codec("dct_topk", {"k": 4, "chunk": 8, "values": "f16"})
    x = torch.zeros(8, 8)
    x[0, 0] = 1e6  # its DC coefficient alone is 1e6 / 8 > 65504
    enc = codec.encode(codec.fit(x))
    _on_the_wire_ok(codec, enc, (8, 8))
    assert float(enc["values"].float().abs().max()) == 65504.0
    fb = ErrorFeedback(1.0)
    u = fb.compensate("t", x)
    fb.commit("t", u, codec.decode(enc, (8, 8)))
    assert bool(torch.isfinite(fb.residuals["t"]).all()) and float(fb.residuals["t"].abs().max()) > 1e5


def test_in_range_inputs_encode_as_before() -> None:
    """Saturation is a no-op inside the range: the bytes are those of the plain cast (the byte formulas and the
    oracles are unchanged)."""
    x = torch.randn(64, 64)
    for values in ("f16", "bf16", "f32"):
        codec = make_codec("dct_topk", {"k": 4096, "chunk": 64, "values": values})
        from node.compress import dct

        plan = dct.plan_blocks((64, 64), 64)
        want = dct.forward(x, plan).reshape(-1).to(codec.layout((64, 64))["values"].dtype)
        assert torch.equal(codec.encode(x)["values"], want)


# -- start-up: what cannot be represented is refused, naming the tensor -------------------------------------

def _reference(recipe: str, named, overrides=None) -> Reference:  # type: ignore[no-untyped-def]
    cfg = make_run_config(recipe, overrides or {}, task=TaskConfig("x:y", {}))
    return Reference(cfg, named)


def test_an_f16_wire_without_error_feedback_is_refused_at_start_up() -> None:
    named = [("layer.weight", torch.zeros(3, 3))]
    with pytest.raises(ConfigError, match="saturates at ±65504.*'layer.weight'.*feedback_decay"):
        _reference("diloco", named, {"codec.name": "fp16"})
    with pytest.raises(ConfigError, match="'layer.weight'"):
        _reference("dct-consistent", named, {"feedback_decay": None})
    _reference("diloco", named, {"codec.name": "fp16", "feedback_decay": 1.0})  # feedback carries the excess
    _reference("diloco", named, {"codec.name": "bf16"})  # bf16 carries fp32's range


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_a_parameter_lowband_cannot_train_is_refused_naming_it(dtype: torch.dtype) -> None:
    from node.train.tensors import trainable

    model = torch.nn.Linear(2, 2).to(dtype)
    with pytest.raises(ConfigError, match="parameter 'weight' is torch.(float64|complex64)"):
        trainable(model)
    with pytest.raises(ConfigError, match="'weight'"):
        _reference("diloco", list(model.named_parameters()))


def test_a_buffer_that_cannot_travel_is_refused_naming_it() -> None:
    from node.train.tensors import buffers

    model = torch.nn.Module()
    model.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    model.register_buffer("cache", torch.zeros(2, dtype=torch.complex64), persistent=False)
    with pytest.raises(ConfigError, match="buffer 'phase'"):
        buffers(model)
    del model.phase
    assert buffers(model) == []  # a non-persistent buffer never travels


@pytest.mark.parametrize("name, params", REPRESENTATIVE, ids=REP_IDS)
def test_empty_tensors_are_carried(name: str, params: dict) -> None:
    codec = make_codec(name, params)
    for shape in ((0,), (3, 0), (0, 4, 2)):
        enc = codec.encode(torch.zeros(shape))
        _on_the_wire_ok(codec, enc, shape)
        assert codec.decode(enc, shape).shape == shape and codec.reduce([enc, enc], shape).shape == shape
