"""The configuration's language-neutral contract: the checked-in JSON Schema is current, every recipe's configuration
meets it, it refuses what the wire's type rules refuse, and the config hash is a function of the JSON alone."""
from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from node import config_schema
from node.config import canonical_config, config_hash_of
from node.errors import ConfigError
from node.recipes import RECIPES, make_run_config

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "config.schema.json"


def test_the_checked_in_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text() == config_schema.schema_text(), (
        "docs/config.schema.json is stale: python -m node.config_schema > docs/config.schema.json")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_meets_the_schema_and_hashes_from_its_json(recipe: str) -> None:
    cfg = make_run_config(recipe, {"reduce.bound": "clip"} if recipe not in ("dct",) else {})
    text = json.dumps(cfg.to_dict())
    config_schema.validate_json(text)
    # a coordinator's config_json, parsed by anyone, hashes to the run's config hash
    assert config_hash_of(json.loads(text), "ab12") == cfg.config_hash("ab12")


@pytest.mark.parametrize("path, value, why", [
    (("recipe", "H"), True, "valid integer"),  # true is not 1
    (("recipe", "H"), 2.0, "valid integer"),  # 2.0 is not 2
    (("recipe", "H"), 0, "greater than or equal to 1"),
    (("recipe", "codec", "params", "scale_dtype"), "f64", "'f32', 'f16' or 'bf16'"),
    (("recipe", "codec", "params", "blocks"), 4, "Extra inputs are not permitted"),
    (("recipe", "codec", "name"), "zip", "does not match any of the expected tags"),
    (("recipe", "payload_scale"), "double", "'unit', 'inverse_inner_lr' or 'inner_lr'"),
    (("seed",), 2 ** 53, "less than or equal to 9007199254740991"),
    (("run_id",), "", "at least 1 character"),
])
def test_the_schema_refuses_malformed_configurations(path: tuple[str, ...], value: object, why: str) -> None:
    d = make_run_config("sign").to_dict()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(pydantic.ValidationError, match=why):
        config_schema.validate(d)


def test_the_config_hash_ignores_formatting_but_not_values() -> None:
    d = make_run_config("sign").to_dict()
    base = config_hash_of(d)
    shuffled = json.loads(json.dumps(dict(reversed(list(d.items())))))
    assert shuffled["recipe"]["outer"]["lr"] == 8.0
    shuffled["recipe"]["outer"]["lr"] = 8  # the integer 8 and the float 8.0 are one JSON number
    assert config_hash_of(shuffled) == base
    d["recipe"]["inner"]["lr"] = 0.0005000000000000001  # the next double: another number, another hash
    assert config_hash_of(d) != base
    for volatile in ("workers", "rounds", "run_id"):  # what does not change the math does not change the hash
        assert config_hash_of({**make_run_config("sign").to_dict(), volatile: 99 if volatile != "run_id" else "x"}) \
            == base


def test_a_value_json_cannot_carry_exactly_is_a_config_error() -> None:
    d = make_run_config("sign").to_dict()
    d["task"]["params"]["big"] = 2 ** 60
    with pytest.raises(ConfigError, match="cannot be hashed"):
        canonical_config(d)
