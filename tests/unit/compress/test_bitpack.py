"""Bit packing: exact sizes, the documented bit order, and round trips for every width in use."""
from __future__ import annotations

import math

import pytest
import torch

from node.compress.bitpack import (index_width, pack_bools, pack_uints, packed_bits_nbytes, unpack_bools,
                                   unpack_uints)


LENGTHS = [0, 1, 7, 8, 9, 1000]
WIDTHS = list(range(17))


def _reference_stream(values: list[int], width: int) -> bytes:
    """Independent packer: value i at bits [i*w, (i+1)*w), LSB first; bit b → bit b%8 of byte b//8."""
    nbits = len(values) * width
    out = bytearray(math.ceil(nbits / 8))
    for i, v in enumerate(values):
        for j in range(width):
            if (v >> j) & 1:
                b = i * width + j
                out[b // 8] |= 1 << (b % 8)
    return bytes(out)


@pytest.mark.parametrize("n", LENGTHS)
def test_bools_round_trip_and_size(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    bits = torch.rand(n, generator=g) < 0.5
    packed = pack_bools(bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (math.ceil(n / 8),)
    out = unpack_bools(packed, n)
    assert out.dtype == torch.bool
    assert out.shape == (n,)
    assert torch.equal(out, bits)
    assert bytes(packed.numpy().tobytes()) == _reference_stream([int(b) for b in bits], 1)


@pytest.mark.parametrize("n", LENGTHS)
def test_bools_all_true_and_all_false(n: int) -> None:
    for fill in (True, False):
        bits = torch.full((n,), fill, dtype=torch.bool)
        packed = pack_bools(bits)
        assert torch.equal(unpack_bools(packed, n), bits)
        if fill and n:
            # padding bits of the last byte stay zero
            assert int(packed[-1]) == (1 << (n % 8 or 8)) - 1


def test_bool_bit_order_is_lsb_first() -> None:
    assert pack_bools(torch.tensor([True] + [False] * 7)).tolist() == [1]
    assert pack_bools(torch.tensor([False] * 7 + [True])).tolist() == [128]
    assert pack_bools(torch.tensor([False] * 8 + [True])).tolist() == [0, 1]


def test_pack_bools_accepts_any_shape() -> None:
    bits = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(unpack_bools(pack_bools(bits), 6), bits.reshape(-1))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("n", LENGTHS)
def test_uints_round_trip_and_size(n: int, width: int) -> None:
    g = torch.Generator().manual_seed(1000 * width + n)
    values = torch.randint(0, 2 ** width, (n,), generator=g, dtype=torch.int64)
    if n and width:
        values[0] = 2 ** width - 1  # the extreme values survive
        values[-1] = 0
    packed = pack_uints(values, width)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * width / 8) == packed_bits_nbytes(n, width)
    out = unpack_uints(packed, n, width)
    assert out.dtype == torch.int64
    assert out.shape == (n,)
    assert torch.equal(out, values)
    assert packed.numpy().tobytes() == _reference_stream(values.tolist(), width)


def test_uints_known_bytes() -> None:
    # 1 → bits 1,0 ; 2 → 0,1 ; 3 → 1,1 : stream 100111 → 0b111001 = 57
    assert pack_uints(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    # 12-bit values straddle bytes: 0xABC, 0x123 → bytes 0xBC, 0x3A, 0x12
    assert pack_uints(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]
    assert unpack_uints(torch.tensor([0xBC, 0x3A, 0x12], dtype=torch.uint8), 2, 12).tolist() == [0xABC, 0x123]


def test_uints_accept_narrow_integer_dtypes() -> None:
    values = torch.tensor([0, 5, 200, 255], dtype=torch.uint8)
    assert unpack_uints(pack_uints(values, 8), 4, 8).tolist() == [0, 5, 200, 255]
    values32 = torch.tensor([4095, 0, 17], dtype=torch.int32)
    assert unpack_uints(pack_uints(values32, 12), 3, 12).tolist() == [4095, 0, 17]


def test_width_zero_packs_to_nothing() -> None:
    packed = pack_uints(torch.zeros(50, dtype=torch.int64), 0)
    assert packed.numel() == 0 and packed.dtype == torch.uint8
    assert unpack_uints(packed, 50, 0).tolist() == [0] * 50


def test_unpack_ignores_padding_bits() -> None:
    # 3 values of 3 bits = 9 bits → 2 bytes; the 7 padding bits do not leak into values
    packed = pack_uints(torch.tensor([7, 0, 5]), 3)
    assert packed.numel() == 2
    dirty = packed.clone()
    dirty[1] |= 0xFE
    assert unpack_uints(dirty, 3, 3).tolist() == [7, 0, 5]


@pytest.mark.parametrize("block,width", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (16, 4), (48, 6), (64, 6),
                                         (65, 7), (768, 10), (1392, 11), (2048, 11), (4096, 12), (4097, 13)])
def test_index_width(block: int, width: int) -> None:
    assert index_width(block) == width
    if block > 1:
        # every index in [0, block) fits, and a narrower width would not fit block-1
        assert 2 ** width >= block > 2 ** (width - 1)
