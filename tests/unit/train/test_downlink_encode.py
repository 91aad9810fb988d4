"""The compressed downlink's encode (node/train/downlink.py) against its definition, DoubleSqueeze's server step
(arXiv 1905.05957): Q = C(A + e), e ← (A + e) − D(Q), computed here from scratch on copies."""
from __future__ import annotations

import pytest
import torch

from node.compress import make_codec
from node.train.downlink import compress_with_feedback


def _definition(codec_name: str, a: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codec = make_codec(codec_name)
    target = a.clone() + e.clone()
    dq = codec.decode(codec.encode(codec.fit(target.clone())), tuple(a.shape))
    return dq, target - dq


@pytest.mark.parametrize("codec_name", ["sign", "identity", "bf16"])
def test_the_encode_is_the_definition_and_leaves_the_aggregate_untouched(codec_name: str) -> None:
    g = torch.Generator().manual_seed(5)
    shapes = [(7, 13), (1000,), (3, 4, 5)]
    aggregate = [torch.randn(s, generator=g) for s in shapes]
    residual = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    before_a = [t.clone() for t in aggregate]
    want = [_definition(codec_name, a, e) for a, e in zip(aggregate, residual)]
    codec = make_codec(codec_name)
    encoded, decoded = compress_with_feedback(codec, ["w", "b", "c"], aggregate, residual)
    for (dq, e_next), dec, e, name, shape in zip(want, decoded, residual, ["w", "b", "c"], shapes):
        assert torch.equal(dec, dq) and torch.equal(e, e_next)
        # Q itself decodes to D(Q) after e was updated in place: no buffer of Q is e's storage (identity's would be)
        assert torch.equal(codec.decode(encoded[name], shape), dq)
    assert all(torch.equal(a, b) for a, b in zip(aggregate, before_a))
    if codec_name == "identity":
        assert all(not bool(e.any()) for e in residual)  # an exact codec leaves no residual


def test_a_residual_that_overflows_is_refused() -> None:
    a, e = [torch.full((4,), 3e38)], [torch.full((4,), 3e38)]
    with pytest.raises(FloatingPointError, match="downlink residual of 'w' is not finite"):
        compress_with_feedback(make_codec("sign"), ["w"], a, e)
