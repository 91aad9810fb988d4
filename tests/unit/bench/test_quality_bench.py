"""`lowband bench quality`: parallel jobs give the same rows as one run after another, and resume keeps rows."""
from __future__ import annotations

import json

import pytest
import torch

from node.bench.quality import Profile, run_quality_bench
from node.errors import ConfigError

MICRO = Profile(size="tiny", batch_size=2, workers=2, steps_per_worker=4, H=2, inner_lr=2e-3, evals=1,
                task_params={"block_size": 16})


def _measured(rows: list[dict]) -> dict[str, tuple]:
    return {r["recipe"]: (r["final_val_loss"], r["bytes_sent_per_worker"], r["rounds"], r["H"]) for r in rows}


def test_parallel_jobs_measure_what_one_job_measures(tmp_path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a parallel job runs with one thread: the same arithmetic as this serial run
    try:
        serial = run_quality_bench(MICRO, tmp_path / "serial", recipes=["ddp", "diloco"],
                                   variants=["sign:outer.lr=8"])
    finally:
        torch.set_num_threads(threads)
    parallel = run_quality_bench(MICRO, tmp_path / "parallel", recipes=["ddp", "diloco"],
                                 variants=["sign:outer.lr=8"], jobs=2)
    assert _measured(parallel) == _measured(serial)
    assert [r["recipe"] for r in parallel] == ["ddp", "diloco", "sign[outer.lr=8]"]  # the order asked for
    assert (serial[0]["H"], serial[1]["H"]) == (1, 2)  # ddp exchanges every step, diloco every H
    written = json.loads((tmp_path / "parallel" / "results.json").read_text())
    assert _measured(written) == _measured(parallel)
    assert (tmp_path / "parallel" / "loss_vs_bytes.png").stat().st_size > 0


def test_a_rerun_keeps_the_rows_measured_and_runs_only_the_new_ones(tmp_path) -> None:
    first = run_quality_bench(MICRO, tmp_path, recipes=["diloco"])
    again = run_quality_bench(MICRO, tmp_path, recipes=["diloco", "sign-nesterov"], jobs=2)
    assert [r["recipe"] for r in again] == ["diloco", "sign-nesterov"]
    assert again[0] == first[0]  # kept as written, not measured again (wall_s would differ)


def test_an_unknown_recipe_fails_before_any_run(tmp_path) -> None:
    with pytest.raises(ConfigError):
        run_quality_bench(MICRO, tmp_path, recipes=["diloco", "no-such-recipe"])
    assert not (tmp_path / "results.json").exists()
