"""The run file (TOML) — what a coordinator serves and what serverless peers agree on: the run itself plus membership and deadline policies.

```toml
[run]          # id, task, recipe, rounds, seed
[task]         # task parameters (size, batch_size, ...)
[recipe]       # any recipe override, flat ("inner.lr" = 1e-3) or nested ([recipe.inner] lr = 1e-3)
[membership]   # min_nodes, max_nodes, heartbeat_s, lease_s, join_token
[rounds]       # initial_wait_s, min_wait_s, max_wait_s, quantile, margin, eval_every, keep_results, snapshot_every,
               # result ("relay" | "aggregate" | "compressed"), aggregate_codec ("identity" | "bf16" | "fp16")
[dht]          # serverless runs: shard_above, owner_wait_s (rounds reduced by shard: node/transport/dht_sharded.py)
[authority]    # serverless runs: public_key, signature, open — written by `lowband run init`
               # (node/transport/dht_trust.py reads it; a coordinator ignores it)
```
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import Recipe, RunConfig, TaskConfig
from node.errors import ConfigError
from node.membership import DeadlinePolicy, MembershipPolicy
from node.outer import outer_is_replica_consistent
from node.recipes import RECIPES, make_run_config
from node.train.downlink import DENSE_AGGREGATE_CODECS


@dataclass(frozen=True)
class DhtPolicy:
    """``[dht]``: serverless rounds. With ``shard_above`` ≥ 1, a round with more than ``shard_above`` agreed members is
    reduced by shard (each member reduces a slice of the tensors and serves it; docs/serverless.md, "Sharded rounds")
    instead of every peer fetching every frame; 0 (the default) never shards: a member that withholds its slices can
    make its own shard aggregates the only ones computable (docs/serverless.md, "Trust"), so sharding is for runs whose
    members are trusted. ``owner_wait_s``: how long a shard's owner has before the next member computes it."""

    shard_above: int = 0
    owner_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.shard_above < 0:
            raise ConfigError(f"dht.shard_above must be ≥ 0 (0: never shard; else rounds of more members are reduced "
                              f"by shard), got {self.shard_above}")
        if not 0 < self.owner_wait_s <= 3600:
            raise ConfigError(f"dht.owner_wait_s must be in (0, 3600] seconds, got {self.owner_wait_s}")


@dataclass(frozen=True)
class RunFile:
    run: RunConfig
    membership: MembershipPolicy = MembershipPolicy()
    deadline: DeadlinePolicy = DeadlinePolicy()
    eval_every: int = 1  # evaluate the reference every K committed rounds (0: never)
    keep_results: int = 8  # committed round results held for late collectors
    snapshot_every: int = 16  # the coordinator snapshots its state every K committed rounds (docs/state.md)
    #: "relay": every member receives every other member's payload (codec-agnostic, exact);
    #: "aggregate": the coordinator reduces and sends one dense frame (wins for many members);
    #: "compressed": the coordinator reduces and sends one frame in the run's own codec, with error feedback of its own
    #: (node/train/downlink.py): one payload down per member per round
    result: str = "relay"
    aggregate_codec: str = "identity"  # identity (fp32), bf16 or fp16; result = "aggregate" only
    extra: dict[str, Any] = field(default_factory=dict)
    authority: dict[str, Any] = field(default_factory=dict)  # [authority] as written (serverless runs check it)
    dht: DhtPolicy = DhtPolicy()

    def dht_record(self) -> dict[str, Any]:
        """What of ``[dht]`` and ``rounds.aggregate_codec`` the authority signs beside the run (every peer must reduce
        a sharded round alike): nothing when all are at their defaults, so run files signed before they existed
        keep their signatures."""
        if self.dht == DhtPolicy() and self.aggregate_codec == "identity":
            return {}
        return {**dataclasses.asdict(self.dht), "aggregate_codec": self.aggregate_codec}

    def __post_init__(self) -> None:
        if self.eval_every < 0:
            raise ConfigError(f"rounds.eval_every must be ≥ 0 (0: never), got {self.eval_every}")
        if self.keep_results < 1:
            raise ConfigError(f"rounds.keep_results must be ≥ 1, got {self.keep_results}")
        if self.snapshot_every < 1:
            raise ConfigError(f"rounds.snapshot_every must be ≥ 1, got {self.snapshot_every}")
        if self.result not in ("relay", "aggregate", "compressed"):
            raise ConfigError(f"rounds.result must be 'relay', 'aggregate' or 'compressed', got {self.result!r}")
        if self.aggregate_codec not in DENSE_AGGREGATE_CODECS:
            raise ConfigError(f"rounds.aggregate_codec must be identity, bf16 or fp16, got {self.aggregate_codec!r}")
        recipe = self.run.recipe
        if self.result == "compressed" and self.aggregate_codec != "identity":
            raise ConfigError(f"rounds.aggregate_codec = {self.aggregate_codec!r} is for result = 'aggregate'; result = "
                              f"'compressed' encodes the aggregate with the recipe's own codec ({recipe.codec.name}): "
                              "remove aggregate_codec, or use result = 'aggregate'")
        if not outer_is_replica_consistent(recipe.outer.name):
            raise ConfigError(f"recipe {recipe.name!r}: its outer optimizer {recipe.outer.name!r} lets replicas drift "
                              f"by design, so there is no global state for a coordinator to serve to joiners; "
                              f"{_consistent_alternative(recipe)}")

    @property
    def compressed_downlink(self) -> bool:
        """The coordinator re-encodes the aggregate with the run's codec and keeps a downlink residual."""
        return self.result == "compressed"

    @property
    def result_codec(self) -> str:
        """The codec name an aggregate frame is sent with (``CollectHeader.aggregate_codec``): the recipe's codec for a
        compressed downlink, ``aggregate_codec`` otherwise (meaningless in relay mode)."""
        return self.run.recipe.codec.name if self.compressed_downlink else self.aggregate_codec


def _consistent_alternative(recipe: Recipe) -> str:
    """Advice for a recipe whose replicas drift: the named recipes that stay consistent with the same codec and
    the same kind of inner loop (local steps or one gradient)."""
    same_codec = [r.name for r in RECIPES.values() if r.codec == recipe.codec and
                  r.inner.optimizer == recipe.inner.optimizer and outer_is_replica_consistent(r.outer.name)]
    if same_codec:
        return f"use {' or '.join(repr(n) for n in same_codec)} in coordinator mode"
    return "use a replica-consistent outer optimizer in coordinator mode"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _section(doc: dict[str, Any], name: str, cls: type, source: str = "run file", extra: tuple[str, ...] = ()) -> Any:
    """The dataclass ``cls`` from the table ``[name]``; an unknown key or a value of the wrong type is a ConfigError
    naming the key and listing the valid ones (``extra``: keys the caller took out of the table already)."""
    values = doc.get(name, {})
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    valid = sorted([*(f.name for f in dataclasses.fields(cls)), *extra])
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"{source}: unknown [{name}] key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
    for f in dataclasses.fields(cls):
        if f.name in values and not _fits(values[f.name], f.default):
            raise ConfigError(f"{source}: [{name}] {f.name} must be {type(f.default).__name__}, got "
                              f"{values[f.name]!r}")
    return cls(**values)


def _fits(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _int(source: str, key: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}") from None


def parse_run_file(text: str, source: str = "run file") -> RunFile:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"run", "task", "recipe", "membership", "rounds", "dht", "authority"}
    if unknown:
        raise ConfigError(f"{source}: unknown section{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(f'[{u}]' for u in sorted(unknown))}; valid sections: [run], [task], [recipe], "
                          "[membership], [rounds], [dht], [authority]"
                          + ("; bounds and robust reduce go under the recipe: [recipe.reduce]" if "reduce" in unknown
                             else ""))
    run = dict(doc.get("run", {}))
    known_run = {"id", "task", "recipe", "rounds", "seed"}
    if set(run) - known_run:
        raise ConfigError(f"{source}: unknown [run] key(s) {', '.join(map(repr, sorted(set(run) - known_run)))}; "
                          f"valid keys: {', '.join(sorted(known_run))}")
    rounds_doc = dict(doc.get("rounds", {}))
    eval_every = _int(source, "rounds.eval_every", rounds_doc.pop("eval_every", 1))
    keep = _int(source, "rounds.keep_results", rounds_doc.pop("keep_results", 8))
    snapshot_every = _int(source, "rounds.snapshot_every", rounds_doc.pop("snapshot_every", 16))
    result_mode = str(rounds_doc.pop("result", "relay"))
    aggregate_codec = str(rounds_doc.pop("aggregate_codec", "identity"))
    task = TaskConfig(run.get("task", "gpt"), dict(doc.get("task", {"size": "tiny", "batch_size": 8})))
    cfg = make_run_config(run.get("recipe", "sign"), _flatten(doc.get("recipe", {})), task=task,
                          workers=1, rounds=_int(source, "run.rounds", run.get("rounds", 100)),
                          seed=_int(source, "run.seed", run.get("seed", 0)),
                          run_id=str(run.get("id", "lowband")))
    return RunFile(run=cfg, membership=_section(doc, "membership", MembershipPolicy, source),
                   deadline=_section({"rounds": rounds_doc}, "rounds", DeadlinePolicy, source,
                                     ("eval_every", "keep_results", "snapshot_every", "result",
                                      "aggregate_codec")),
                   eval_every=eval_every, keep_results=keep, snapshot_every=snapshot_every, result=result_mode,
                   aggregate_codec=aggregate_codec,
                   authority=dict(doc.get("authority", {})), dht=_section(doc, "dht", DhtPolicy, source))


def load_run_file(path: str | Path) -> RunFile:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read run file {p}: {exc}") from None
    return parse_run_file(text, str(p))


def build_run_file(*, run_id: str, recipe: str, rounds: int, seed: int = 0, task: str = "gpt",
                   task_params: dict[str, Any] | None = None, recipe_overrides: dict[str, Any] | None = None,
                   membership: dict[str, Any] | None = None, rounds_policy: dict[str, Any] | None = None) -> str:
    """The TOML text of a run file (the one builder that tools, benches and tests use), checked by parsing it back:
    a builder never emits a file ``lowband coordinator`` would refuse. ``recipe_overrides`` are flat dotted keys
    (``{"H": 16, "inner.lr": 2e-3}``); ``membership`` and ``rounds_policy`` fill ``[membership]`` and ``[rounds]``."""
    import tomli_w

    doc: dict[str, Any] = {"run": {"id": run_id, "task": task, "recipe": recipe, "rounds": rounds, "seed": seed}}
    if task_params is not None:
        doc["task"] = dict(task_params)
    for section, values in (("recipe", recipe_overrides), ("membership", membership), ("rounds", rounds_policy)):
        if values:
            doc[section] = dict(values)
    text = tomli_w.dumps(doc)
    parse_run_file(text, f"built run file {run_id!r}")
    return text
