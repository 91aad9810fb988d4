"""``lowband bench quality``: every recipe on the built-in task at equal tokens per worker.

Writes DIR/results.json (one object per recipe), DIR/results.md (a table plus ratios against
``diloco``) and DIR/loss_vs_bytes.png (validation loss against bytes sent per worker, log x).
All recipes share the model, data, worker count, inner peak lr and token budget; recipes with local
steps share one H, so byte ratios compare codecs at the same H.
"""
from __future__ import annotations

import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import RunConfig, TaskConfig
from node.errors import ConfigError
from node.fsutil import write_atomic
from node.recipes import get_recipe, make_run_config
from node.train.simulate import SimResult, simulate
from node.progress import progress_iter

log = logging.getLogger(__name__)

ALL_RECIPES = ("ddp", "diloco", "dsm", "sign", "sign-nesterov", "dct", "dct-consistent", "sparseloco", "demo")


@dataclass(frozen=True)
class Profile:
    size: str
    batch_size: int
    workers: int
    steps_per_worker: int  # equal tokens: every recipe runs this many inner steps per worker
    H: int  # for recipes with local steps; ddp and demo exchange every step
    inner_lr: float
    evals: int  # evaluation points along the run
    task_params: dict[str, Any] = field(default_factory=dict)


PROFILES = {
    "quick": Profile(size="tiny", batch_size=8, workers=4, steps_per_worker=768, H=32, inner_lr=2e-3, evals=8),
    # >= 100 outer rounds per recipe at H = 16 (192 rounds); 4-9 min per H = 16 recipe and 17-19 min for ddp and demo
    # with one torch thread: all nine recipes in under an hour on 2 cores with --jobs 2 (BENCHMARKS.md)
    "standard": Profile(size="tiny", batch_size=8, workers=4, steps_per_worker=3072, H=16, inner_lr=2e-3, evals=16),
    "full": Profile(size="small", batch_size=16, workers=4, steps_per_worker=4096, H=64, inner_lr=1e-3, evals=16),
}


def has_local_steps(recipe: str, overrides: dict[str, Any] | None = None) -> bool:
    """Whether the recipe (with ``overrides``) trains locally between exchanges; an inner loop of one gradient
    (``inner.optimizer = "grad"``: ddp, DeMo) exchanges every step, so it runs at H = 1."""
    inner = dict(overrides or {}).get("inner.optimizer", get_recipe(recipe).inner.optimizer)
    return inner != "grad"


#: variant keys that are a coordinator's ``[rounds]`` settings, not recipe fields (``simulate``'s keywords)
RESULT_KEYS = ("result", "aggregate_codec")


def _run_config(recipe: str, prof: Profile, extra: dict[str, Any] | None = None) -> tuple[RunConfig, dict[str, str]]:
    """The run's configuration and its ``[rounds]`` settings; raises ConfigError for a bad recipe or override."""
    extra = dict(extra or {})
    rounds_settings = {k: str(extra.pop(k)) for k in RESULT_KEYS if k in extra}
    H = prof.H if has_local_steps(recipe, extra) else 1
    rounds = prof.steps_per_worker // H
    overrides: dict[str, Any] = {"H": H, "inner.lr": prof.inner_lr, "inner.total_steps": rounds * H, **extra}
    task = TaskConfig("gpt", {"size": prof.size, "batch_size": prof.batch_size, **prof.task_params})
    cfg = make_run_config(recipe, overrides, task=task, workers=prof.workers, rounds=rounds, seed=0,
                          run_id=f"bench-{recipe}")
    return cfg, rounds_settings


def _run_recipe(recipe: str, prof: Profile, device: str, extra: dict[str, Any] | None = None) -> SimResult:
    cfg, rounds_settings = _run_config(recipe, prof, extra)
    return simulate(cfg, device=device, eval_every=max(1, cfg.rounds // prof.evals), **rounds_settings)


_FINGERPRINTS: dict[str, str] = {}


def _task_fingerprint(cfg: RunConfig) -> str:
    """The task's fingerprint (part of the config hash); built once per task (building the corpus takes seconds)."""
    from node.tasks import load_task

    key = json.dumps([cfg.task.name, cfg.task.params], sort_keys=True)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = load_task(cfg.task.name, **cfg.task.params).fingerprint
    return _FINGERPRINTS[key]


def _row(res: SimResult) -> dict[str, Any]:
    return row_from_result(res.to_dict())


def _measure(recipe: str, prof: Profile, device: str, extra: dict[str, Any], label: str, profile: str,
             threads: int | None) -> dict[str, Any]:
    """One run → its table row. ``threads``: torch threads for this run (a parallel job gets one core's worth: two
    runs with 2 threads each on 2 cores are slower together than one after the other)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    res = _run_recipe(recipe, prof, device, extra)
    row = _row(res)
    row["recipe"], row["profile"] = label, profile
    log.info("bench quality: %s final val %.4f, %d bytes sent/worker, %.1f s", label, res.final_val_loss,
             res.bytes_sent_per_worker, res.wall_s)
    return row


def row_from_result(d: dict[str, Any]) -> dict[str, Any]:
    """A table row from a simulation's result (``SimResult.to_dict()``, or the JSON ``lowband simulate --json``
    writes): its fields, bits per parameter per round, and the evaluated points of its curve."""
    d = dict(d)
    d["bits_per_param_per_round"] = d["payload_bytes_per_round"] * 8 / d["params"]
    d["curve"] = [{"round": h["round"], "bytes_sent_per_worker": h["bytes_sent_per_worker"],
                   "tokens_per_worker": h["tokens_per_worker"], "val_loss": h["val_loss"]}
                  for h in d.pop("history") if h["val_loss"] is not None]
    return d


def _markdown(rows: list[dict[str, Any]], prof: Profile | str, command: str, baseline: str = "diloco") -> str:
    """The table; Δ and the byte ratio are against the row labelled ``baseline`` ("n/a" without one: a row merely
    named like it — e.g. DiLoCo at another H — would make every comparison wrong)."""
    base = next((r for r in rows if r["recipe"] == baseline), None)
    lines = [f"Profile: {prof}", f"Baseline: {base['recipe'] if base else 'none (no row labelled ' + repr(baseline) + ')'}",
             f"Command: `{command}`", f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}", "",
             "| recipe | workers | H | rounds | tokens/worker | final val loss | Δ vs diloco (nats) | bytes sent/worker "
             "| bytes recv/worker | bits/param/round | × fewer bytes than diloco | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dloss = f"{r['final_val_loss'] - base['final_val_loss']:+.3f}" if base else "n/a"
        ratio = f"{base['bytes_sent_per_worker'] / r['bytes_sent_per_worker']:.3g}" if base else "n/a"
        lines.append(f"| {r['recipe']} | {r['workers']} | {r['H']} | {r['rounds']} | {r['tokens_per_worker']} | "
                     f"{r['final_val_loss']:.4f} | {dloss} | {r['bytes_sent_per_worker']:,} | "
                     f"{r['bytes_received_per_worker']:,} | {r['bits_per_param_per_round']:.3f} | {ratio} | "
                     f"{r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    # the default cycle repeats after 10 colours: two curves of one colour in a sweep would be read as one recipe
    colors = plt.get_cmap("tab20").colors if len(rows) > 10 else plt.get_cmap("tab10").colors
    for i, r in enumerate(rows):
        xs = [c["bytes_sent_per_worker"] for c in r["curve"]]
        ys = [c["val_loss"] for c in r["curve"]]
        ax.plot(xs, ys, marker="os^v"[i // len(colors) % 4], markersize=3, color=colors[i % len(colors)],
                label=f"{r['recipe']} (H={r['H']})")
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per worker (log)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("lowband: validation loss vs bytes sent, equal tokens per worker")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue(), durable=False)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``sign:outer.lr=8,H=16`` → ("sign", {"outer.lr": 8, "H": 16}): a recipe with overrides, as an extra row.
    ``result=compressed`` (or ``aggregate``, with ``aggregate_codec=bf16``) runs it as a coordinator in that
    ``[rounds] result`` mode would (node/train/simulate.py)."""
    from node.config import parse_value

    recipe, _, rest = text.partition(":")
    overrides = {}
    for pair in filter(None, rest.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--variant {text!r}: expected RECIPE:KEY=VALUE[,KEY=VALUE], got {pair!r}")
        overrides[key] = parse_value(value)
    return recipe, overrides


def run_quality_bench(profile: str | Profile, out: Path, recipes: list[str] | None = None, device: str = "cpu",
                      command: str = "", variants: list[str] | None = None, jobs: int = 1) -> list[dict[str, Any]]:
    """Run the profile's recipes (and ``variants``) and write results.json, results.md and the plot to ``out``.

    ``profile``: a name in PROFILES or a Profile ("custom" in the rows). ``jobs`` > 1 runs that many recipes at
    once, each in its own process with one torch thread (on 2 CPU cores, ``jobs = 2`` finishes the standard
    profile in about half the time of one run after another). Every run is deterministic (seed 0): the rows equal
    those of one run after another with one torch thread. Raises KeyError for an unknown profile and ConfigError
    for an unknown recipe (before any run starts)."""
    prof, profile = (profile, "custom") if isinstance(profile, Profile) else (PROFILES[profile], profile)
    out.mkdir(parents=True, exist_ok=True)
    command = command or f"lowband bench quality --profile {profile} --out {out}"
    path = out / "results.json"
    # a rerun with the same profile resumes: rows already measured are kept, not run again
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    others = sorted({str(r.get("profile")) for r in rows} - {profile})
    if others:
        raise ConfigError(f"{path} holds results of profile {', '.join(others)}, not {profile}: use another --out "
                          "(a rerun into the same directory resumes the same profile)")
    started = time.perf_counter()
    runs = [(r, {}) for r in (ALL_RECIPES if recipes is None else recipes)] + [parse_variant(v) for v in variants or []]
    todo = []
    for recipe, extra in runs:
        label = f"{recipe}[{','.join(f'{k}={v}' for k, v in extra.items())}]" if extra else recipe
        cfg, _ = _run_config(recipe, prof, extra)  # a bad name or setting fails now, not after an hour of other runs
        expected = cfg.config_hash(_task_fingerprint(cfg))
        kept = next((r for r in rows if r["recipe"] == label), None)
        if kept is not None and kept.get("config_hash") == expected:
            log.info("bench quality: %s already in %s, kept", label, path)
            continue
        if kept is not None:  # measured with other settings (a default changed since): measured again
            log.warning("bench quality: %s in %s was measured with another configuration (hash %s, now %s): running "
                        "it again", label, path, kept.get("config_hash"), expected)
            rows.remove(kept)
        todo.append((recipe, extra, label))
    order = [label for _, _, label in todo]

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        # partial results survive an interrupted benchmark
        write_atomic(out / "results.json", json.dumps(rows, indent=2))

    failed: list[str] = []
    if jobs <= 1:
        for recipe, extra, label in progress_iter(todo, "bench quality"):  # the ETA counts the runs left
            log.info("bench quality: %s %s ...", recipe, extra or "")
            keep(_measure(recipe, prof, device, extra, label, profile, None))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # the longest runs first (H = 1 recipes exchange every step), so the last job does not run alone
        todo.sort(key=lambda t: has_local_steps(t[0], t[1]))
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_measure, recipe, prof, device, extra, label, profile, 1): label
                       for recipe, extra, label in todo}
            for future in progress_iter(as_completed(futures), "bench quality", total=len(futures)):
                try:
                    keep(future.result())
                except Exception as exc:  # noqa: BLE001 — one failed run must not lose the others' rows
                    log.error("bench quality: %s failed: %s: %s", futures[future], type(exc).__name__, exc)
                    failed.append(futures[future])
    rows.sort(key=lambda r: order.index(r["recipe"]) if r["recipe"] in order else -1)  # kept rows first
    write_atomic(out / "results.json", json.dumps(rows, indent=2))
    write_atomic(out / "results.md", _markdown(rows, prof, command))
    _plot(rows, out / "loss_vs_bytes.png")
    log.info("bench quality: done in %.1f s → %s", time.perf_counter() - started, out)
    print(_markdown(rows, prof, command))
    if failed:
        raise RuntimeError(f"bench quality: {len(failed)} run(s) failed ({', '.join(failed)}); the others' rows are "
                           f"in {out}: rerun the same command to measure only those")
    return rows


def collect_results(files: list[Path], out: Path, command: str = "", baseline: str = "diloco") -> list[dict[str, Any]]:
    """Table and plot from results ``lowband simulate --json`` wrote (a sweep run as separate commands): each
    file's stem labels its row; Δ and byte ratios are against the row labelled ``baseline`` (a file's stem). Files
    holding ``{"skipped": ...}`` are left out. Raises ConfigError for a file that is not such a result."""
    rows = []
    for f in files:
        d = json.loads(f.read_text())
        if isinstance(d, dict) and "skipped" in d:
            continue
        if not isinstance(d, dict) or "history" not in d or "final_val_loss" not in d:
            raise ConfigError(f"{f} is not a `lowband simulate --json` result (a bench's results.json is a list of "
                              "rows: pass the simulate files themselves)")
        row = row_from_result(d)
        row["recipe"] = f.stem
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    command = command or f"lowband bench quality --collect {' '.join(map(str, files))} --out {out}"
    table = _markdown(rows, "results of separate `lowband simulate --json` runs", command, baseline)
    write_atomic(out / "results.json", json.dumps(rows, indent=2))
    write_atomic(out / "results.md", table)
    _plot(rows, out / "loss_vs_bytes.png")
    print(table)
    return rows
