"""Run configuration: one dataclass per component, validated on construction, composed into RunConfig.

Precedence (resolved here, nowhere else): recipe defaults < run file < ``--set key=value`` flags.
The config hash covers everything that changes the math or the bytes, so two nodes with different
hashes are never mixed in one run. It is defined on RFC 8785 canonical JSON (``canonical_config``), so another
language reproduces it from the JSON alone; the rule and a fixed vector are in docs/wire.md ("The config hash").
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import rfc8785

from node.errors import ConfigError

#: fields of the configuration that the hash leaves out: they do not change the math or the bytes
HASH_EXCLUDED = ("workers", "rounds", "run_id")

PAYLOAD_SCALES = ("unit", "inverse_inner_lr", "inner_lr")
INNER_OPTIMIZERS = ("adamw", "sgd", "muon", "grad")
BOUNDS = ("none", "clip", "reject")
ROBUST_MODES = ("none", "trimmed_mean", "median", "vote", "clipped_selector_mean")
#: robust modes that only one codec can run, by codec name
ROBUST_CODEC = {"vote": "sign", "clipped_selector_mean": "dct_topk"}


@dataclass(frozen=True)
class InnerConfig:
    """The local optimizer. ``grad`` takes no local step: the payload is the gradient itself (H = 1)."""

    optimizer: str = "adamw"
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    warmup_steps: int | None = None  # None: min(500, total steps // 10)
    min_lr_ratio: float = 0.1
    total_steps: int | None = None  # None: rounds × H of the run

    def __post_init__(self) -> None:
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"inner.optimizer must be one of {INNER_OPTIMIZERS}, got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"inner.lr must be a positive number, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"inner.warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"inner.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"inner.grad_clip must be > 0 or none, got {self.grad_clip}")
        object.__setattr__(self, "betas", tuple(self.betas))


@dataclass(frozen=True)
class CodecConfig:
    name: str = "identity"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OuterConfig:
    """The outer optimizer; ``lr_follows_inner`` makes its lr = lr × η_t (DSM's γ·η_t, DeMo's η_t)."""

    name: str = "nesterov"
    lr: float = 0.7
    params: dict[str, Any] = field(default_factory=dict)
    lr_follows_inner: bool = False
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"outer.lr must be ≥ 0, got {self.lr}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"outer.clip_norm must be > 0 or none, got {self.clip_norm}")


def _number(section: str, name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ConfigError(f"{section}.{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")


@dataclass(frozen=True)
class ReduceConfig:
    """How a round's frames are bounded and combined when some members may be broken or hostile
    (docs/algorithms.md, §11). The default — every field at its default — is today's reduce, exactly: no bound,
    the codec's own reduce, nothing kept, nothing in the config hash or the state.

    - ``bound``: per sender and tensor, the decoded L2 norm ``n`` is compared with ``τ = bound_ratio · ref``, where
      ``ref`` is the median of the round's senders' norms of that tensor, capped at ``history_ratio`` × an
      exponential average (decay ``history``) of past rounds' ``ref`` (kept in the reference state). ``clip`` scales
      a payload above ``τ`` down to ``τ`` (in the codec's own representation); ``reject`` drops the frame. A norm
      above ``absurd_ratio · ref`` is rejected under either policy.
    - ``robust``: the combination: ``none`` (the codec's reduce), ``trimmed_mean`` or ``median`` (coordinate-wise,
      over decoded payloads, any codec; ``trim`` is the fraction cut from each side), ``vote`` (sign codec: majority
      sign × mean of the bounded scales; needs a bound), ``clipped_selector_mean`` (DCT-top-k: every value clipped
      to ``bound_ratio`` × the median over senders of each block's largest magnitude, then selector-mean).
    - ``evict_after``: a member with this many flagged frames (clipped or rejected) among its last ``evict_window``
      contributions is evicted: every replica drops its frames from then on (0: never).
    """

    bound: str = "none"
    bound_ratio: float = 2.0
    history: float = 0.9
    history_ratio: float = 4.0
    absurd_ratio: float = 1000.0
    robust: str = "none"
    trim: float = 0.25
    evict_after: int = 0
    evict_window: int = 8

    def __post_init__(self) -> None:
        if self.bound not in BOUNDS:
            raise ConfigError(f"reduce.bound must be one of {BOUNDS}, got {self.bound!r}")
        if self.robust not in ROBUST_MODES:
            raise ConfigError(f"reduce.robust must be one of {ROBUST_MODES}, got {self.robust!r}")
        _number("reduce", "bound_ratio", self.bound_ratio, 1.0)
        _number("reduce", "history", self.history, 0.0, 1.0, high_open=True)
        _number("reduce", "history_ratio", self.history_ratio, 1.0)
        _number("reduce", "absurd_ratio", self.absurd_ratio, self.bound_ratio)
        _number("reduce", "trim", self.trim, 0.0, 0.5, high_open=True)
        for name, value, low, high in (("evict_after", self.evict_after, 0, 64),
                                       ("evict_window", self.evict_window, 1, 64)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"reduce.{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.evict_after > self.evict_window:
            raise ConfigError(f"reduce.evict_after ({self.evict_after}) must be ≤ reduce.evict_window "
                              f"({self.evict_window})")
        if self.evict_after and self.bound == "none":
            raise ConfigError("reduce.evict_after counts clipped or rejected frames: it needs reduce.bound = clip or "
                              "reject")
        if self.robust == "vote" and self.bound == "none":
            raise ConfigError("reduce.robust = vote takes the mean of the senders' scales: it needs reduce.bound = "
                              "clip or reject, or one sender's scale sets every step's size")

    @property
    def enabled(self) -> bool:
        """Whether anything differs from the codec's plain reduce (a bound or a robust mode)."""
        return self.bound != "none" or self.robust != "none"


@dataclass(frozen=True)
class Recipe:
    """One codec + feedback policy + outer optimizer + defaults for H and the inner loop."""

    name: str
    H: int
    codec: CodecConfig
    outer: OuterConfig
    inner: InnerConfig = InnerConfig()
    feedback_decay: float | None = None  # None: no error feedback
    payload_scale: str = "unit"  # what multiplies Δ before the codec: 1, 1/η_t or η_t
    #: overlapped rounds: train round r+1 while round r's exchange is in flight and apply round r's outer step
    #: one round late, shifting the local model by what round r changed (node/train/worker.py)
    overlap: bool = False
    #: bounds and robust reduce (docs/algorithms.md, §11); the default is the codec's plain reduce
    reduce: ReduceConfig = ReduceConfig()

    def __post_init__(self) -> None:
        from node.compress import make_codec  # late import: config must stay importable on its own

        if not isinstance(self.H, int) or isinstance(self.H, bool) or self.H < 1:
            raise ConfigError(f"H must be an integer ≥ 1, got {self.H!r}")
        if self.payload_scale not in PAYLOAD_SCALES:
            raise ConfigError(f"payload_scale must be one of {PAYLOAD_SCALES}, got {self.payload_scale!r}")
        if self.feedback_decay is not None and not 0.0 <= self.feedback_decay <= 1.0:
            raise ConfigError(f"feedback_decay must be in [0, 1] or none, got {self.feedback_decay}")
        make_codec(self.codec.name, self.codec.params)  # raises ConfigError naming a bad codec/param
        import torch

        from node.outer import make_outer
        make_outer(self.outer.name, [("probe", torch.zeros(1))], self.outer.lr, dict(self.outer.params))
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"overlap must be true or false, got {self.overlap!r}")
        if self.overlap and self.inner.optimizer == "grad":
            raise ConfigError("overlap needs local steps: with inner.optimizer 'grad' there is no model to move on")
        if self.inner.optimizer == "grad" and self.H != 1:
            raise ConfigError(f"inner.optimizer 'grad' exchanges every gradient, so H must be 1 (got H={self.H})")
        if self.payload_scale == "inverse_inner_lr" and self.inner.min_lr_ratio == 0:
            raise ConfigError("payload_scale 'inverse_inner_lr' divides by η_t: inner.min_lr_ratio must be > 0")
        if not isinstance(self.reduce, ReduceConfig):
            raise ConfigError(f"reduce must be a [reduce] table, got {self.reduce!r}")
        needs = ROBUST_CODEC.get(self.reduce.robust)
        if needs is not None and self.codec.name != needs:
            raise ConfigError(f"reduce.robust = {self.reduce.robust} works on {needs} payloads; this recipe's codec "
                              f"is {self.codec.name!r} (trimmed_mean and median work on every codec)")
        if self.reduce.enabled and self.outer.name == "decoupled_nesterov":
            raise ConfigError("reduce: bounds and robust modes change the agreed aggregate, which the faithful "
                              "decoupled rule does not apply (every worker applies its own Δ); use dct-consistent")
        if self.outer.name == "decoupled_nesterov":
            beta = self.outer.params.get("momentum", 0.95)
            if self.feedback_decay is None or abs(self.feedback_decay - beta) > 1e-12:
                raise ConfigError("outer 'decoupled_nesterov' keeps its Nesterov buffer in the codec's error feedback: "
                                  f"feedback_decay ({self.feedback_decay}) must equal outer.momentum ({beta})")


@dataclass(frozen=True)
class TaskConfig:
    name: str = "gpt"  # "gpt" or "package.module:function"
    params: dict[str, Any] = field(default_factory=lambda: {"size": "tiny", "batch_size": 8})


@dataclass(frozen=True)
class RunConfig:
    recipe: Recipe
    task: TaskConfig = TaskConfig()
    workers: int = 4
    rounds: int = 10
    seed: int = 0
    run_id: str = "lowband"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be ≥ 1, got {self.workers}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be ≥ 1, got {self.rounds}")
        if not isinstance(self.run_id, str) or not 0 < len(self.run_id) <= 128:
            raise ConfigError(f"run id must be a string of 1–128 characters, got {self.run_id!r}")

    @property
    def total_inner_steps(self) -> int:
        return self.recipe.inner.total_steps or self.rounds * self.recipe.H

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``recipe.reduce`` only when it is not the default, so a run without bounds or robust reduce
        has the configuration (and config hash, and state header) it had before they existed."""
        d = asdict(self)
        if self.recipe.reduce == ReduceConfig():
            del d["recipe"]["reduce"]
        return d

    def config_hash(self, task_fingerprint: str = "") -> str:
        """Identifies the math and the bytes: everything but the worker count, round count and run id
        (``config_hash_of``)."""
        return config_hash_of(self.to_dict(), task_fingerprint)

    def legacy_config_hash(self, task_fingerprint: str = "") -> str:
        """The hash of protocol 2 (Python's ``json.dumps(sort_keys=True)``, float formatting included): only to
        recognise a coordinator state dir or a checkpoint written before the hash was defined on canonical JSON."""
        d = self.to_dict()
        for volatile in HASH_EXCLUDED:
            d.pop(volatile)
        d["task_fingerprint"] = task_fingerprint
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def canonical_config(config: Mapping[str, Any], task_fingerprint: str = "") -> bytes:
    """The bytes the config hash covers: ``config`` (``RunConfig.to_dict()``, or the JSON a coordinator hands out,
    parsed) without ``workers``, ``rounds`` and ``run_id``, with ``task_fingerprint`` added, serialized as RFC 8785
    canonical JSON (keys sorted by UTF-16 code units, no whitespace, numbers in ECMAScript's shortest form: 1.0 is
    ``1``, 4e-4 is ``0.0004``; strings UTF-8 with minimal escapes). Raises ConfigError for a value JSON cannot carry
    exactly (an integer beyond ±(2^53 − 1), NaN, ±inf, a type JSON lacks)."""
    d = {k: v for k, v in config.items() if k not in HASH_EXCLUDED}
    d["task_fingerprint"] = task_fingerprint
    try:
        return rfc8785.dumps(d)
    except rfc8785.CanonicalizationError as exc:
        raise ConfigError(f"the run configuration cannot be hashed: {exc}") from None


def config_hash_of(config: Mapping[str, Any], task_fingerprint: str = "") -> str:
    """16 hex characters: the first 64 bits of sha256(``canonical_config(config, task_fingerprint)``)."""
    return hashlib.sha256(canonical_config(config, task_fingerprint)).hexdigest()[:16]


def parse_value(text: str) -> Any:
    """``--set`` values: JSON where it parses (numbers, true/false, lists), ``none`` → None, else a string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set_path(d: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    """Set ``path`` in the nested config dict ``d``; unknown leaf keys go into a sibling ``params``."""
    head, rest = path[0], path[1:]
    if head not in d:
        if "params" in d and not rest:  # e.g. codec.k → codec.params.k
            d["params"] = {**d["params"], head: value}
            return
        raise ConfigError(f"unknown setting {full!r}: no field {head!r} here (fields: {sorted(d)})")
    if rest:
        if not isinstance(d[head], dict):
            raise ConfigError(f"unknown setting {full!r}: {head!r} has no sub-fields")
        d[head] = dict(d[head])
        _set_path(d[head], rest, value, full)
    else:
        d[head] = value


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """``{"H": 32, "codec.k": 16, "inner.lr": 1e-3, "task.size": "small"}`` → a new, validated RunConfig.

    Keys without a prefix are looked up on the run, then the recipe (so ``H`` and ``feedback_decay`` work);
    ``task.X`` sets a task parameter. All keys are applied to a plain dict first and validated once at the
    end, so cross-field rules (dct's feedback_decay = outer.momentum) see the final combination.
    """
    d = copy.deepcopy(asdict(cfg))  # every field, ``recipe.reduce`` included, so overrides can name it
    run_fields = {f.name for f in fields(RunConfig)}
    for key, value in overrides.items():
        path = key.split(".")
        if path[0] == "task" and len(path) == 2 and path[1] != "name":
            path = ["task", "params", path[1]]
        if path[0] not in run_fields:
            path = ["recipe", *path]
        _set_path(d, path, value, key)
    return run_config_from_dict(d)


def run_config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Inverse of ``RunConfig.to_dict`` (e.g. the JSON a coordinator hands a joining node); validates."""
    try:
        r = dict(d["recipe"])
        recipe = Recipe(name=r["name"], H=r["H"], codec=CodecConfig(**r["codec"]), outer=OuterConfig(**r["outer"]),
                        inner=InnerConfig(**r["inner"]), feedback_decay=r["feedback_decay"],
                        payload_scale=r["payload_scale"], overlap=r.get("overlap", False),
                        reduce=_reduce_from(r.get("reduce")))
        return RunConfig(recipe=recipe, task=TaskConfig(**d["task"]), workers=d["workers"], rounds=d["rounds"],
                         seed=d["seed"], run_id=d["run_id"])
    except KeyError as exc:
        raise ConfigError(f"run config is missing the field {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"run config has a malformed field: {exc}") from None


def _reduce_from(value: Any) -> ReduceConfig:
    if value is None:
        return ReduceConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(f"recipe.reduce must be a table, got {value!r}")
    try:
        return ReduceConfig(**value)
    except TypeError as exc:
        raise ConfigError(f"recipe.reduce: {exc}") from None


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two config dicts, with both values."""
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out.extend(diff_configs(va, vb, path + "."))
        elif va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)):
            out.append(f"{path}: {va!r} vs {vb!r}")
    return out
