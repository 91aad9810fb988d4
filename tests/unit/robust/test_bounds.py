"""node/robust/bounds.py: the per-sender bound rule against hand-computed values (docs/algorithms.md §11)."""
from __future__ import annotations

import math

import pytest

from node.config import ReduceConfig
from node.errors import ConfigError
from node.robust.bounds import decide, median, quantize

CLIP = ReduceConfig(bound="clip", bound_ratio=2.0)
REJECT = ReduceConfig(bound="reject", bound_ratio=2.0)


def test_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones() -> None:
    assert median([5.0, 1.0, 3.0]) == 3.0
    assert median([4.0, 1.0, 3.0, 100.0]) == 3.5  # (3 + 4) / 2
    assert median([7.0]) == 7.0
    with pytest.raises(ValueError):
        median([])


def test_quantize_keeps_12_significant_bits() -> None:
    assert quantize(5.0) == 5.0 and quantize(0.0) == 0.0
    assert quantize(1 + 2 ** -13) == 1.0  # below half a unit of the 12th bit: rounded away
    assert quantize(1 + 3 * 2 ** -13) == 1 + 2 ** -11  # 1.5 units of 2^-12 round to 2 units (banker's rounding to even)
    # two sums that differ in their last bits (another summation order) quantize to the same float
    assert quantize(math.sqrt(2) * (1 + 1e-15)) == quantize(math.sqrt(2))


def test_clip_scales_the_outlier_to_bound_ratio_times_the_median() -> None:
    # one tensor; norms 1, 2, 3, 40: median (2 + 3) / 2 = 2.5, τ = 5 → the fourth is scaled by 5 / 40 = 0.125
    d = decide(["w"], [[1.0], [2.0], [3.0], [40.0]], [0.0], CLIP)
    assert d.reference == (2.5,)
    assert d.factors == ((1.0,), (1.0,), (1.0,), (0.125,))
    assert d.rejected == ("", "", "", "")
    assert [d.clipped(i) for i in range(4)] == [0, 0, 0, 1]
    assert d.history == (2.5,)  # the first round's reference starts the history


def test_bounds_are_per_tensor() -> None:
    # tensor a: norms 1, 1, 1 (τ 2, nobody clipped); tensor b: 1, 1, 8 (τ 2 → the third scaled by 2 / 8 = 0.25)
    d = decide(["a", "b"], [[1.0, 1.0], [1.0, 1.0], [1.0, 8.0]], [0.0, 0.0], CLIP)
    assert d.factors == ((1.0, 1.0), (1.0, 1.0), (1.0, 0.25))


def test_reject_drops_the_frame_and_says_why() -> None:
    d = decide(["blocks.0.w"], [[1.0], [2.0], [3.0], [40.0]], [0.0], REJECT)
    assert d.factors == ((1.0,), (1.0,), (1.0,), (1.0,))
    assert d.rejected[:3] == ("", "", "")
    assert "tensor 'blocks.0.w': norm 40 is above reduce.bound_ratio 2 × the round's reference 2.5" in d.rejected[3]


def test_an_absurd_norm_is_rejected_even_under_clip() -> None:
    cfg = ReduceConfig(bound="clip", bound_ratio=2.0, absurd_ratio=1000.0)
    d = decide(["w"], [[1.0], [1.0], [1.0], [5000.0]], [0.0], cfg)
    assert d.rejected[3].endswith("(more than reduce.absurd_ratio 1000): absurd, rejected")
    assert "norm 5000 is 5e+03 × the round's reference 1" in d.rejected[3]
    ok = decide(["w"], [[1.0], [1.0], [1.0], [999.0]], [0.0], cfg)  # below the absurd line: clipped to 2 / 999
    assert ok.rejected == ("",) * 4 and ok.factors[3] == (2.0 / 999.0,)


def test_the_history_caps_the_reference_and_follows_it_slowly() -> None:
    cfg = ReduceConfig(bound="clip", bound_ratio=2.0, history=0.9, history_ratio=4.0)
    # a hostile majority: median 100, but past rounds had 2 → reference min(100, 4 × 2) = 8, τ = 16
    d = decide(["w"], [[1.0], [100.0], [100.0]], [2.0], cfg)
    assert d.reference == (8.0,)
    assert d.factors == ((1.0,), (0.16,), (0.16,))
    assert d.history == (pytest.approx(0.9 * 2.0 + 0.1 * 8.0),)  # 2.6
    # under the cap the median stands, and the history moves a tenth of the way
    d = decide(["w"], [[3.0], [3.0], [3.0]], [2.0], cfg)
    assert d.reference == (3.0,) and d.history == (pytest.approx(2.1),)


def test_no_history_when_its_decay_is_zero() -> None:
    d = decide(["w"], [[1.0], [100.0], [100.0]], [2.0], ReduceConfig(bound="clip", history=0.0))
    assert d.reference == (100.0,) and d.history == (0.0,)


def test_a_zero_reference_clips_to_zero_without_calling_it_absurd() -> None:
    d = decide(["w"], [[0.0], [0.0], [3.0]], [0.0], CLIP)
    assert d.reference == (0.0,) and d.factors[2] == (0.0,) and d.rejected == ("", "", "")


def test_no_bound_decides_nothing_but_still_reports_the_reference() -> None:
    d = decide(["w"], [[1.0], [2.0], [1e9]], [0.0], ReduceConfig(robust="median"))
    assert d.factors == ((1.0,),) * 3 and d.rejected == ("",) * 3 and d.reference == (2.0,)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one sender"):
        decide(["w"], [], [0.0], CLIP)
    with pytest.raises(ValueError, match="one norm per tensor"):
        decide(["a", "b"], [[1.0]], [0.0, 0.0], CLIP)


@pytest.mark.parametrize("fields,message", [
    ({"bound": "cap"}, "reduce.bound must be one of"),
    ({"robust": "krum"}, "reduce.robust must be one of"),
    ({"bound_ratio": 0.5}, "reduce.bound_ratio must be a number in [1, inf)"),
    ({"history": 1.0}, "reduce.history must be a number in [0, 1)"),
    ({"absurd_ratio": 1.5}, "reduce.absurd_ratio must be a number in [2, inf)"),
    ({"trim": 0.5}, "reduce.trim must be a number in [0, 0.5)"),
    ({"evict_after": 3}, "it needs reduce.bound = clip or reject"),
    ({"bound": "clip", "evict_after": 65}, "reduce.evict_after must be an integer in [0, 64]"),
    ({"bound": "clip", "evict_after": 5, "evict_window": 4}, "must be ≤ reduce.evict_window"),
    ({"robust": "vote"}, "it needs reduce.bound = clip or reject"),
    ({"bound_ratio": float("nan")}, "reduce.bound_ratio must be a number"),
])
def test_reduce_config_refuses_bad_values_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ReduceConfig(**fields)
    assert message in str(info.value)
