"""The run files that the demo and the benches build (node/runfile.build_run_file) say what each tool means, and
the demo prints a round's line only once that line is final."""
from __future__ import annotations

import math

import pytest

from node.bench.fake_nodes import protocol_run_file
from node.bench.join import join_run_file
from node.bench.network import network_run_file
from node.bench.quality import ALL_RECIPES, has_local_steps
from node.bench.soak import SoakConfig, soak_run_file
from node.demo import demo_run_file, round_line, rounds_to_show
from node.roundlog import RoundRow
from node.recipes import get_recipe
from node.runfile import parse_run_file


def test_demo_runs_every_recipe_at_its_own_outer_defaults_and_the_profiles_inner_lr() -> None:
    sign = parse_run_file(demo_run_file("sign", rounds=5, H=3, nodes=3))
    assert (sign.run.run_id, sign.run.rounds, sign.run.recipe.H) == ("demo-sign", 5, 3)
    assert sign.run.recipe.inner.lr == 2e-3  # the inner lr the recipes' outer defaults were tuned at
    assert sign.membership.min_nodes == 2 and sign.eval_every == 1
    for recipe in ("sign", "dsm", "diloco", "sparseloco"):  # no outer setting of the demo's own
        assert parse_run_file(demo_run_file(recipe, 5, 3, 3)).run.recipe.outer == get_recipe(recipe).outer


def test_bench_run_files_carry_their_settings() -> None:
    net = parse_run_file(network_run_file("sign", "tiny", 1, 8, 4, True, "aggregate"))
    assert net.run.recipe.overlap and net.result == "aggregate" and net.membership.min_nodes == 4
    assert net.run.task.params == {"size": "tiny", "batch_size": 1, "block_size": 128} and net.eval_every == 0
    join = parse_run_file(join_run_file("sign", "tiny", H=4, batch=8, min_nodes=3))
    assert join.membership.min_nodes == 3 and join.run.recipe.inner.lr == 1e-3
    proto = parse_run_file(protocol_run_file("dct-consistent", "tiny"))
    assert proto.run.recipe.name == "dct-consistent" and proto.deadline.max_wait_s == 120.0
    soak = parse_run_file(soak_run_file(SoakConfig(recipe="sign", rounds=7, H=2)))
    assert (soak.run.rounds, soak.run.recipe.H, soak.membership.lease_s) == (7, 2, 4.0)


def test_quality_runs_one_gradient_recipes_at_H_1() -> None:
    assert [r for r in ALL_RECIPES if not has_local_steps(r)] == ["ddp", "demo"]
    assert not has_local_steps("sign", {"inner.optimizer": "grad"})


def row(r: int, val: float = math.nan) -> RoundRow:
    return RoundRow(round=r, committed_at=0.0, members=["a", "b"], reason="", fingerprint="f", bytes_in=1234,
                    bytes_out=0, duration_s=0.5, mean_loss=3.0, val_loss=val)


def test_a_round_line_waits_for_its_val_loss_or_the_end_of_the_run() -> None:
    rows = [row(0, 2.5), row(1), row(2)]
    assert [r.round for r in rounds_to_show(rows, 0, ended=False)] == [0]  # round 1 is being evaluated
    assert rounds_to_show(rows, 1, ended=False) == []
    assert [r.round for r in rounds_to_show(rows, 1, ended=True)] == [1, 2]


def test_a_round_the_evaluator_skipped_is_shown_once_a_later_one_is_scored() -> None:
    rows = [row(0, 2.5), row(1), row(2, 2.4), row(3)]  # the evaluator jumped from 0 to 2: 1 never gets a loss
    assert [r.round for r in rounds_to_show(rows, 1, ended=False)] == [1, 2]
    assert [r.round for r in rounds_to_show([row(0), row(2, 1.0)], 0, ended=True)] == [0]  # never past a gap


@pytest.mark.parametrize("val,shown", [(2.5, " val_loss=2.5000 "), (math.nan, " bytes_in")])
def test_round_lines(val: float, shown: str) -> None:
    line = round_line(row(4, val), 12)
    assert line.startswith("round   4/12: members=2 train_loss=3.0000") and shown in line


def sim_json(path, recipe: str, loss: float, sent: int) -> None:
    import json

    path.write_text(json.dumps({
        "recipe": recipe, "workers": 4, "H": 16, "rounds": 2, "tokens_per_worker": 2048, "final_val_loss": loss,
        "bytes_sent_per_worker": sent, "bytes_received_per_worker": 3 * sent, "payload_bytes_per_round": sent // 2,
        "params": 1000, "wall_s": 1.0, "history": [
            {"round": 0, "bytes_sent_per_worker": sent // 2, "tokens_per_worker": 1024, "val_loss": None},
            {"round": 1, "bytes_sent_per_worker": sent, "tokens_per_worker": 2048, "val_loss": loss}]}))


def test_collect_tables_separate_simulate_runs_against_the_diloco_row(tmp_path) -> None:
    from node.bench.quality import collect_results

    sim_json(tmp_path / "diloco_lr0.7.json", "diloco", 1.5, 8000)
    sim_json(tmp_path / "sign_lr8.json", "sign", 1.75, 250)
    (tmp_path / "sign_lr2.json").write_text('{"skipped": "pruned"}')
    rows = collect_results(sorted(tmp_path.glob("*.json")), tmp_path / "out", baseline="diloco_lr0.7")
    assert [r["recipe"] for r in rows] == ["diloco_lr0.7", "sign_lr8"]
    assert rows[1]["bits_per_param_per_round"] == 125 * 8 / 1000
    assert rows[1]["curve"] == [{"round": 1, "bytes_sent_per_worker": 250, "tokens_per_worker": 2048,
                                 "val_loss": 1.75}]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| sign_lr8 | 4 | 16 | 2 | 2048 | 1.7500 | +0.250 | 250 | 750 | 1.000 | 32 |" in table
    assert (tmp_path / "out" / "loss_vs_bytes.png").stat().st_size > 0
