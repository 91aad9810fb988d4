"""The JSON form of a run configuration (``RunConfig.to_dict()``, GetRun's ``config_json``) as typed models, and the
JSON Schema generated from them (docs/config.schema.json): what another language needs to read or write a
configuration without lowband's Python.

The models mirror node/config.py's dataclasses and the checks their constructors make that one field can express
(ranges, allowed names); rules that tie several fields together (``feedback_decay`` equal to the outer momentum for
``decoupled_nesterov``, ``reduce.robust = vote`` only on the sign codec, …) stay in node/config.py and are listed in
docs/wire.md. The dataclasses remain the authority: a configuration this schema accepts may still be refused by
them, never the other way round (tests/unit/test_config_contract.py checks every recipe against both).

Regenerate the checked-in schema with ``python -m node.config_schema > docs/config.schema.json``; a test fails when
it is stale.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_ID = "https://lowband.invalid/schema/run-config/v1"  # a name, not a location: nothing is served there

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[int, Field(ge=1)]
SafeInt = Annotated[int, Field(ge=-(2 ** 53 - 1), le=2 ** 53 - 1)]  # what RFC 8785 (the config hash) can carry


class _Model(BaseModel):
    # strict: true, 1 and 1.0 are different things in a configuration, as on the wire (an int is still a float)
    model_config = ConfigDict(extra="forbid", strict=True)


class InnerJSON(_Model):
    """The local optimizer (``InnerConfig``); ``grad`` takes no local step (H = 1)."""

    optimizer: Literal["adamw", "sgd", "muon", "grad"] = "adamw"
    lr: Annotated[float, Field(gt=0.0, description="peak inner learning rate")] = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: Optional[Annotated[float, Field(gt=0.0)]] = Field(1.0, description="global norm clip; null: none")
    warmup_steps: Optional[Annotated[int, Field(ge=0)]] = Field(None, description="null: min(500, total // 10)")
    min_lr_ratio: Probability = 0.1
    total_steps: Optional[Positive] = Field(None, description="null: rounds × H")


class DenseParams(_Model):
    pass


class DenseCodecJSON(_Model):
    """Every element at fp32 (``identity``), bf16 or fp16."""

    name: Literal["identity", "bf16", "fp16"]
    params: DenseParams = DenseParams()


class SignParams(_Model):
    block: Annotated[int, Field(ge=0, description="elements per scale; 0: one scale per tensor")] = 0
    scale_dtype: Literal["f32", "f16", "bf16"] = "f32"
    reduce: Literal["mean", "vote"] = "mean"


class SignCodecJSON(_Model):
    name: Literal["sign"]
    params: SignParams = SignParams()


class DctTopKParams(_Model):
    k: Positive = 32
    chunk: Annotated[int, Field(ge=1, description="target DCT block side")] = 64
    values: Literal["f16", "bf16", "f32", "int8", "sign"] = "f16"
    reduce: Literal["selector-mean", "mean"] = "selector-mean"


class DctTopKCodecJSON(_Model):
    name: Literal["dct_topk"]
    params: DctTopKParams = DctTopKParams()


class SparseTopKParams(_Model):
    k: Positive = 64
    chunk: Positive = 4096
    bits: Annotated[int, Field(ge=1, le=8)] = 2
    range_sigmas: Annotated[float, Field(gt=0.0)] = 6.0
    reduce: Literal["mean", "selector-mean"] = "mean"


class SparseTopKCodecJSON(_Model):
    name: Literal["sparse_topk"]
    params: SparseTopKParams = SparseTopKParams()


CodecJSON = Annotated[Union[DenseCodecJSON, SignCodecJSON, DctTopKCodecJSON, SparseTopKCodecJSON],
                      Field(discriminator="name")]


class NesterovParams(_Model):
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9


class DecoupledParams(_Model):
    momentum: Probability = 0.95


class SignMomentumParams(_Model):
    betas: tuple[Probability, Probability] = (0.95, 0.98)
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.1
    sign_mode: Literal["exact", "randomized"] = "exact"
    seed: SafeInt = 0


class SignSgdParams(_Model):
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0


class _OuterCommon(_Model):
    lr: Annotated[float, Field(ge=0.0)] = 0.7
    lr_follows_inner: bool = Field(False, description="outer lr × the inner schedule's η_t")
    clip_norm: Optional[Annotated[float, Field(gt=0.0)]] = None


class NesterovJSON(_OuterCommon):
    name: Literal["nesterov"]
    params: NesterovParams = NesterovParams()


class DecoupledJSON(_OuterCommon):
    name: Literal["decoupled_nesterov"]
    params: DecoupledParams = DecoupledParams()


class SignMomentumJSON(_OuterCommon):
    name: Literal["sign_momentum"]
    params: SignMomentumParams = SignMomentumParams()


class SignSgdJSON(_OuterCommon):
    name: Literal["sign_sgd"]
    params: SignSgdParams = SignSgdParams()


class AdamWJSON(_OuterCommon):
    name: Literal["adamw"]
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of torch.optim.AdamW")


OuterJSON = Annotated[Union[NesterovJSON, DecoupledJSON, SignMomentumJSON, SignSgdJSON, AdamWJSON],
                      Field(discriminator="name")]


class ReduceJSON(_Model):
    """Bounds and robust reduce (docs/algorithms.md §11); absent from a configuration when every field is at its
    default."""

    bound: Literal["none", "clip", "reject"] = "none"
    bound_ratio: Annotated[float, Field(ge=1.0)] = 2.0
    history: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    history_ratio: Annotated[float, Field(ge=1.0)] = 4.0
    absurd_ratio: Annotated[float, Field(ge=1.0, description="at least bound_ratio")] = 1000.0
    robust: Literal["none", "trimmed_mean", "median", "vote", "clipped_selector_mean"] = "none"
    trim: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.25
    evict_after: Annotated[int, Field(ge=0, le=64, description="at most evict_window")] = 0
    evict_window: Annotated[int, Field(ge=1, le=64)] = 8


class RecipeJSON(_Model):
    name: str = Field(description="the recipe's name, for people (the fields below are the math)")
    H: Positive = Field(description="inner steps per round")
    codec: CodecJSON
    outer: OuterJSON
    inner: InnerJSON
    feedback_decay: Optional[Probability] = Field(description="error feedback decay; null: no error feedback")
    payload_scale: Literal["unit", "inverse_inner_lr", "inner_lr"]
    overlap: bool = False
    reduce: ReduceJSON = ReduceJSON()


class TaskJSON(_Model):
    name: str = Field(description='"gpt" or "package.module:function"')
    params: dict[str, Any] = Field(default_factory=dict, description="the task's own keyword arguments")


class RunConfigJSON(_Model):
    """A lowband run configuration, as GetRun and Join carry it in config_json."""

    model_config = ConfigDict(extra="forbid", strict=True, title="lowband run configuration")

    recipe: RecipeJSON
    task: TaskJSON
    workers: Positive
    rounds: Positive
    seed: SafeInt
    run_id: Annotated[str, Field(min_length=1, max_length=128)]


ADAPTER = TypeAdapter(RunConfigJSON)


def validate_json(text: str | bytes) -> RunConfigJSON:
    """``text`` (a configuration as JSON) checked against the schema; raises pydantic.ValidationError naming each
    field. (JSON mode: arrays are what the schema's pairs are; strict Python mode would want tuples.)"""
    return ADAPTER.validate_json(text)


def validate(config: Any) -> RunConfigJSON:
    """``config`` (parsed JSON, or ``RunConfig.to_dict()``) checked as ``validate_json`` checks its JSON."""
    return validate_json(json.dumps(config))


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a run configuration."""
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID}
    out.update(ADAPTER.json_schema())
    return out


def schema_text() -> str:
    """The checked-in file's exact text."""
    return json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(schema_text(), end="")
