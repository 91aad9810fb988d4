"""The in-process simulator on the built-in gpt task (tiny): every recipe runs, bytes are counted exactly,
and a run is a deterministic function of its config."""
from __future__ import annotations

import math
from typing import Any, Iterator

import pytest

from node.config import RunConfig, TaskConfig
from node.recipes import RECIPES, make_run_config
from node.tasks import corpus as C
from node.tasks.gpt import GPTTask, num_params
from node.train.simulate import SimResult, simulate

TASK_PARAMS: dict[str, Any] = {"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 2}
WORKERS, ROUNDS = 2, 2
REPLICA_CONSISTENT = {"ddp", "diloco", "dsm", "sign", "sign-nesterov", "dct-consistent", "demo", "sparseloco"}


@pytest.fixture(scope="module", autouse=True)
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[C.Corpus]:
    """Build the stdlib corpus once into a temporary cache; simulate() then finds it there via LOWBAND_CACHE."""
    cache = tmp_path_factory.mktemp("lowband-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBAND_CACHE", str(cache))
        yield C.load_stdlib_corpus(cache_dir=cache)


def run_config(recipe: str, seed: int = 0, **overrides: Any) -> RunConfig:
    H = 1 if recipe in ("ddp", "demo") else 2  # 'grad' recipes exchange every step
    return make_run_config(recipe, {"H": H, **overrides}, task=TaskConfig("gpt", dict(TASK_PARAMS)),
                           workers=WORKERS, rounds=ROUNDS, seed=seed)


_RESULTS: dict[str, SimResult] = {}


def result_for(recipe: str) -> SimResult:
    """One simulation per recipe, shared by the tests of this module."""
    if recipe not in _RESULTS:
        _RESULTS[recipe] = simulate(run_config(recipe))
    return _RESULTS[recipe]


def test_all_recipes_are_covered() -> None:
    assert set(RECIPES) == REPLICA_CONSISTENT | {"dct"}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_simulate_runs_and_counts_bytes_exactly(recipe: str, corpus_cache: C.Corpus) -> None:
    res = result_for(recipe)
    cfg = run_config(recipe)
    task = GPTTask(corpus=corpus_cache, **TASK_PARAMS)
    assert task.config.block_size == 32  # the task parameter reached the model
    assert res.recipe == recipe and res.workers == WORKERS and res.rounds == ROUNDS and res.H == cfg.recipe.H
    assert math.isfinite(res.final_val_loss) and 0 < res.final_val_loss < 10
    assert res.params == num_params(task.build_model(0))
    assert res.tokens_per_worker == ROUNDS * cfg.recipe.H * 2 * 32
    assert res.task_fingerprint == task.fingerprint
    assert res.config_hash == cfg.config_hash(task.fingerprint)
    # exact accounting: every frame of a sender has the same size, each worker sends one per round
    # and receives every other member's
    assert res.payload_bytes_per_round > 0
    assert res.bytes_sent_per_worker == ROUNDS * res.payload_bytes_per_round
    assert res.bytes_received_per_worker == (WORKERS - 1) * res.bytes_sent_per_worker
    assert len(res.history) == ROUNDS
    for r, rec in enumerate(res.history):
        assert rec.round == r and rec.members == WORKERS
        assert rec.bytes_sent_per_worker == (r + 1) * res.payload_bytes_per_round
        assert rec.bytes_received_per_worker == (WORKERS - 1) * rec.bytes_sent_per_worker
        assert math.isfinite(rec.train_loss) and rec.inner_lr > 0
    last = res.history[-1]
    assert last.val_loss == res.final_val_loss
    assert last.replicas_identical is (recipe in REPLICA_CONSISTENT)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_simulate_is_deterministic(recipe: str) -> None:
    first = result_for(recipe).to_dict()
    again = simulate(run_config(recipe)).to_dict()
    first.pop("wall_s")
    again.pop("wall_s")
    assert again == first


def test_different_seed_gives_a_different_run() -> None:
    a = result_for("sign")
    b = simulate(run_config("sign", seed=1))
    assert b.final_val_loss != a.final_val_loss
    assert b.config_hash != a.config_hash  # the seed is part of the math


def test_payload_sizes_order_as_designed() -> None:
    dense = result_for("diloco").payload_bytes_per_round
    assert result_for("dsm").payload_bytes_per_round == dense == result_for("ddp").payload_bytes_per_round
    sign = result_for("sign").payload_bytes_per_round
    dct = result_for("dct").payload_bytes_per_round
    assert dct == result_for("dct-consistent").payload_bytes_per_round == result_for("demo").payload_bytes_per_round
    assert dct < sign < dense / 20
    assert result_for("sign-nesterov").payload_bytes_per_round == sign
    # 1.6 % of a large tensor at 12 + 2 bits an entry; the tiny model is mostly small tensors (min(k, n) each)
    assert result_for("sparseloco").payload_bytes_per_round < sign / 3


def test_sign_payload_is_about_one_bit_per_parameter() -> None:
    res = result_for("sign")
    bits_per_param = res.payload_bytes_per_round * 8 / res.params
    assert 1.0 <= bits_per_param <= 1.1
    dense = result_for("diloco")
    assert 32.0 <= dense.payload_bytes_per_round * 8 / dense.params <= 32.5  # fp32 + envelope


def test_on_round_callback_sees_every_round() -> None:
    seen = []
    res = simulate(run_config("dct-consistent"), eval_every=1, on_round=seen.append)
    assert [rec.round for rec in seen] == list(range(ROUNDS))
    assert all(rec.val_loss is not None and rec.replicas_identical for rec in seen)
    assert seen == res.history


@pytest.mark.parametrize("recipe", ["sign-nesterov", "sparseloco"])
def test_simulate_runs_a_compressed_downlink(recipe: str) -> None:
    """``result = "compressed"``: every worker receives one frame per round in the run's codec, the same size as what
    it sent but for the signature (64 bytes) and the sender's name ("coordinator" vs "w0": 9 bytes), and the replicas
    stay identical."""
    res = simulate(run_config(recipe), result="compressed")
    assert res.history[-1].replicas_identical and math.isfinite(res.final_val_loss)
    assert res.bytes_received_per_worker == res.bytes_sent_per_worker - ROUNDS * (64 - 9)


def test_simulate_dense_aggregate_is_relay_by_other_bytes() -> None:
    """``result = "aggregate"`` with fp32 frames applies exactly the mean the members compute in relay mode: the same
    run, bit for bit, with one dense frame down instead of the other member's payload."""
    relay = result_for("sign-nesterov")
    dense = simulate(run_config("sign-nesterov"), result="aggregate")
    assert dense.final_val_loss == relay.final_val_loss and dense.history[-1].replicas_identical
    assert dense.bytes_sent_per_worker == relay.bytes_sent_per_worker
    assert dense.bytes_received_per_worker > 30 * relay.bytes_received_per_worker  # fp32 vs 1 bit per parameter
    with pytest.raises(ValueError, match="result must be one of relay, aggregate, compressed, got 'dense'"):
        simulate(run_config("sign-nesterov"), result="dense")
