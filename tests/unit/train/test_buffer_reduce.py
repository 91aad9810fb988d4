"""The buffers' rule (node/train/buffer_reduce.py) against its definition computed here with plain Python numbers:
floating buffers the mean of an fp64 sum in order, integer buffers the max, bool buffers any — and frame by frame the
same bits as all at once."""
from __future__ import annotations

import pytest
import torch

from node.train.buffer_reduce import add_buffer, finish_buffer, reduce_buffer
from node.wire import ExtraSpec


def test_floating_buffers_are_the_fp64_mean_in_order_cast_back() -> None:
    spec = ExtraSpec("running_var", (3,), torch.bfloat16)
    values = [torch.tensor([1.0, 2.5, -3.0], dtype=torch.bfloat16), torch.tensor([0.5, 0.25, 8.0], dtype=torch.bfloat16),
              torch.tensor([3e38, -1.0, 1.0], dtype=torch.bfloat16)]
    want = [sum(float(v[i]) for v in values) / 3 for i in range(3)]  # Python floats are fp64, summed in order
    got = reduce_buffer(values, spec)
    assert got.dtype == torch.bfloat16 and got.tolist() == torch.tensor(want, dtype=torch.bfloat16).tolist()


def test_integer_buffers_take_the_max_and_bool_buffers_any() -> None:
    count = ExtraSpec("num_batches_tracked", (), torch.int64)
    assert int(reduce_buffer([torch.tensor(7), torch.tensor(12), torch.tensor(9)], count)) == 12
    mask = ExtraSpec("mask", (3,), torch.bool)
    got = reduce_buffer([torch.tensor([True, False, False]), torch.tensor([False, False, True])], mask)
    assert got.tolist() == [True, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int32, torch.bool])
def test_frame_by_frame_is_all_at_once_and_leaves_the_values_alone(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    spec = ExtraSpec("b", (4, 5), dtype)
    values = [(torch.randn(4, 5, generator=g) * 10).to(dtype) for _ in range(6)]
    copies = [v.clone() for v in values]
    total = None
    for v in values:
        total = add_buffer(total, v, spec)
    assert total is not None
    assert torch.equal(finish_buffer(total, len(values), spec), reduce_buffer(values, spec))
    assert all(torch.equal(v, c) for v, c in zip(values, copies))  # the first value is never written into


def test_no_value_is_refused() -> None:
    with pytest.raises(ValueError, match="no value to reduce"):
        reduce_buffer([], ExtraSpec("b", (1,), torch.float32))
