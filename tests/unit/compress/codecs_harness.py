"""Shared by the codec test modules (test_codecs_roundtrip.py, test_codecs_reduce_feedback.py,
test_codecs_validation.py): their module-scoped one-thread fixture (imported by each, so it applies to each),
the codec configuration tables, input tensors, the byte formulas (docs/algorithms.md, §5) and the sign
reference, all computed without the codec."""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from node.compress.base import numel_of


SHAPES = [(), (1,), (7,), (96,), (256, 128), (3, 4, 5), (97, 29)]

SIGN_PARAMS = [dict(block=b, scale_dtype=s, reduce=r)
               for b, s, r in itertools.product([0, 100], ["f32", "f16"], ["mean", "vote"])]
DCT_PARAMS = [dict(k=k, chunk=c, values=v, reduce=r)
              for v, r, k, c in itertools.product(["f16", "bf16", "f32", "int8", "sign"], ["selector-mean", "mean"],
                                                  [1, 32, 4096], [64, 10])]
CONFIGS: list[tuple[str, dict[str, Any]]] = ([("identity", {}), ("bf16", {}), ("fp16", {})]
                                             + [("sign", p) for p in SIGN_PARAMS]
                                             + [("dct_topk", p) for p in DCT_PARAMS])
CONFIG_IDS = [f"{n}-" + "-".join(f"{v}" for v in p.values()) for n, p in CONFIGS]
# a smaller set for the more expensive checks: every value format and both reduces, fewer k/chunk combinations
SMALL_CONFIGS = [(n, p) for n, p in CONFIGS
                 if n != "dct_topk" or (p["k"], p["chunk"]) in ((32, 64), (1, 10), (4096, 64))]
SMALL_IDS = [f"{n}-" + "-".join(f"{v}" for v in p.values()) for n, p in SMALL_CONFIGS]

_SCALE_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
_SCALE_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + sum(shape) + 31 * len(shape))
    return torch.randn(shape, generator=g)


def _raw(buf: torch.Tensor) -> bytes:
    return buf.contiguous().view(torch.uint8).numpy().tobytes()


def _largest_divisor(d: int, target: int) -> int:
    return max(c for c in range(1, min(d, target) + 1) if d % c == 0)


def _blocks(shape: tuple[int, ...], chunk: int) -> tuple[int, int, int, int]:
    """Independent block plan: (rows, cols, br, bc)."""
    n = numel_of(shape)
    rows, cols = (1, n) if len(shape) <= 1 else (shape[0], n // shape[0])
    return rows, cols, _largest_divisor(rows, chunk), _largest_divisor(cols, chunk)


def expected_nbytes(name: str, params: dict[str, Any], shape: tuple[int, ...]) -> int:
    """The byte formulas of docs/algorithms.md (§5) and the codec docs, computed without the codec."""
    n = numel_of(shape)
    if name == "identity":
        return 4 * n
    if name in ("bf16", "fp16"):
        return 2 * n
    if name == "sign":
        chunks = 0 if n == 0 else (1 if params["block"] == 0 else math.ceil(n / params["block"]))
        return math.ceil(n / 8) + chunks * _SCALE_ITEMSIZE[params["scale_dtype"]]
    assert name == "dct_topk"
    rows, cols, br, bc = _blocks(shape, params["chunk"])
    bs = br * bc
    nb = n // bs
    k = min(params["k"], bs)
    width = 0 if k == bs else math.ceil(math.log2(bs))
    indices = math.ceil(nb * k * width / 8)
    values = {"f16": 2 * nb * k, "bf16": 2 * nb * k, "f32": 4 * nb * k,
              "int8": nb * k + 4 * nb, "sign": math.ceil(nb * k / 8) + 4 * nb}[params["values"]]
    return indices + values


def _sign_expected(x: torch.Tensor, block: int, scale_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded tensor, per-chunk scales as sent) computed chunk by chunk in Python."""
    flat = x.reshape(-1)
    n = flat.numel()
    size = n if block == 0 else block
    scales, out = [], []
    for start in range(0, n, max(size, 1)):
        part = flat[start:start + size]
        s = torch.tensor(float(part.abs().double().mean())).to(_SCALE_DTYPE[scale_dtype]).float()
        scales.append(s)
        out.append(torch.where(part >= 0, s, -s))
    return torch.cat(out).reshape(x.shape), torch.stack(scales)
