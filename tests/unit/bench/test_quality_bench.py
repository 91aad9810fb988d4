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


def test_a_bad_variant_fails_before_any_run(tmp_path) -> None:
    for bad in ("sign:outre.lr=8", "sign:outer.lr"):
        with pytest.raises(ConfigError):
            run_quality_bench(MICRO, tmp_path, recipes=["diloco"], variants=[bad])
        assert not (tmp_path / "results.json").exists()


def test_a_results_dir_of_another_profile_is_refused_not_emptied(tmp_path) -> None:
    run_quality_bench(MICRO, tmp_path, recipes=["diloco"])
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ConfigError, match="profile custom"):
        run_quality_bench("quick", tmp_path, recipes=["diloco"])
    assert (tmp_path / "results.json").read_text() == before


def test_a_kept_row_measured_with_other_settings_is_measured_again(tmp_path) -> None:
    first = run_quality_bench(MICRO, tmp_path, recipes=["diloco"])
    rows = json.loads((tmp_path / "results.json").read_text())
    rows[0]["config_hash"] = "0" * 16  # as if measured before a default changed
    (tmp_path / "results.json").write_text(json.dumps(rows))
    again = run_quality_bench(MICRO, tmp_path, recipes=["diloco"])
    assert len(again) == 1 and again[0]["config_hash"] == first[0]["config_hash"]


def test_collect_compares_against_the_baseline_named_not_the_first_diloco_like_row(tmp_path) -> None:
    from node.bench.quality import collect_results

    rows = run_quality_bench(MICRO, tmp_path / "m", recipes=["diloco", "sign-nesterov"])
    sims = {}
    for r in rows:  # back to `simulate --json` shape: the curve as history
        d = {k: v for k, v in r.items() if k not in ("curve", "bits_per_param_per_round")}
        d["history"] = [{**c} for c in r["curve"]]
        sims[r["recipe"]] = d
    files = []
    for stem, rec in (("diloco_H64", "diloco"), ("diloco_lr0.7", "diloco"), ("signnest", "sign-nesterov")):
        f = tmp_path / f"{stem}.json"
        f.write_text(json.dumps({**sims[rec], "final_val_loss": sims[rec]["final_val_loss"] + (1.0 if stem ==
                                                                                               "diloco_H64" else 0)}))
        files.append(f)
    collect_results(files, tmp_path / "c", baseline="diloco_lr0.7")
    table = (tmp_path / "c" / "results.md").read_text()
    assert "Baseline: diloco_lr0.7" in table
    assert "| diloco_H64 |" in table and "+1.000" in table  # measured against diloco_lr0.7, not against itself
    with pytest.raises(ConfigError, match="not a `lowband simulate --json` result"):
        collect_results([tmp_path / "m" / "results.json"], tmp_path / "c2")
