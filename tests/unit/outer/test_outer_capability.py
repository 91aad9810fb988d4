"""Replica consistency asked of a configuration (an optimizer's name) agrees with the built optimizer, and the
run file refuses a coordinator run by that capability, not by recipe name."""
from __future__ import annotations

import pytest
import torch

from node.errors import ConfigError
from node.outer import OUTER_CLASSES, OUTER_OPTIMIZERS, is_replica_consistent, make_outer, outer_is_replica_consistent
from node.recipes import RECIPES
from node.runfile import build_run_file, parse_run_file


def test_every_registered_optimizer_has_a_class_to_ask() -> None:
    assert set(OUTER_CLASSES) == set(OUTER_OPTIMIZERS)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_the_name_lookup_agrees_with_the_built_optimizer(recipe: str) -> None:
    outer = RECIPES[recipe].outer
    built = make_outer(outer.name, [("w", torch.zeros(2, 2))], outer.lr, dict(outer.params))
    assert type(built) is OUTER_CLASSES[outer.name]
    assert outer_is_replica_consistent(outer.name) == is_replica_consistent(built)


def test_only_decoupled_nesterov_lets_replicas_drift() -> None:
    assert [n for n in sorted(OUTER_CLASSES) if not outer_is_replica_consistent(n)] == ["decoupled_nesterov"]
    with pytest.raises(ConfigError, match="unknown outer optimizer 'nope'"):
        outer_is_replica_consistent("nope")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_run_file_is_refused_exactly_when_its_outer_optimizer_drifts(recipe: str) -> None:
    text = f"[run]\nrecipe = '{recipe}'"
    if outer_is_replica_consistent(RECIPES[recipe].outer.name):
        assert parse_run_file(text).run.recipe.name == recipe
        assert build_run_file(run_id="r", recipe=recipe, rounds=3)
    else:
        with pytest.raises(ConfigError, match=f"recipe '{recipe}': its outer optimizer .* drift"):
            parse_run_file(text)
