"""``lowband bench byzantine``: what one or two hostile members of 8 cost, with and without robust reduce settings.

Every case is one ``simulate`` run (the built-in task, every worker signing its frames and verifying the others'),
with the last ``m`` workers attacking (node/bench/attacks.py: their frames are well-formed and correctly signed) and
either the recipe as named (``robust off``) or with the recommended settings for untrusted members
(node/robust/defaults.py, ``robust on``). The clean runs (no attacker) of both settings are the baselines: the table
gives each case's final validation loss and its difference to the clean run without robust settings, and the clean
run with them shows what the settings cost when nobody attacks.

Writes DIR/results.json (one object per case, written after each case; a rerun skips cases already there),
DIR/results.md (the tables) and DIR/byzantine.png (the damage per attack, per recipe).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from node.cli_checks import positive_int
from node.fsutil import write_atomic
from node.progress import progress_iter

if TYPE_CHECKING:
    from node.train.worker import Worker

log = logging.getLogger(__name__)
RECIPES = ("diloco", "sign", "dct-consistent")
ATTACKS = ("scale", "flip", "noise", "alie")  # node/bench/attacks.py (imported when a case runs: `lowband` starts fast)


@dataclass(frozen=True)
class Case:
    recipe: str
    attack: str  # "none" or one of ATTACKS
    attackers: int
    robust: bool

    @property
    def key(self) -> str:
        return f"{self.recipe}/{self.attack}/{self.attackers}/{'on' if self.robust else 'off'}"


def cases(recipes: Sequence[str], attacks: Sequence[str], attackers: Sequence[int], robust: str,
          plain_attackers: Sequence[int] | None = None) -> list[Case]:
    """The grid: per recipe the clean runs (robust off and on), then every attack × attacker count × setting.
    ``robust``: "both", "on" or "off"; ``plain_attackers``: the attacker counts run without robust settings (default:
    all)."""
    settings = {"both": (False, True), "on": (True,), "off": (False,)}[robust]
    plain = set(attackers if plain_attackers is None else plain_attackers)
    out = []
    for recipe in recipes:
        out += [Case(recipe, "none", 0, s) for s in (False, True)]
        for m in attackers:
            for attack in attacks:
                out += [Case(recipe, attack, m, s) for s in settings if s or m in plain]
    return out


def run_case(case: Case, *, workers: int, rounds: int, H: int, inner_lr: float, size: str, batch_size: int,
             eval_batches: int, evals: int) -> dict[str, Any]:
    """One simulate run; returns its row (final val loss, curve, accountability per member)."""
    from node.bench.attacks import make_attack
    from node.config import TaskConfig
    from node.recipes import get_recipe, make_run_config
    from node.robust.defaults import untrusted_overrides
    from node.train.simulate import simulate

    overrides: dict[str, Any] = {"H": H, "inner.lr": inner_lr, "inner.total_steps": rounds * H}
    if case.robust:
        overrides |= untrusted_overrides(get_recipe(case.recipe))
    task = TaskConfig("gpt", {"size": size, "batch_size": batch_size, "eval_batches": eval_batches})
    cfg = make_run_config(case.recipe, overrides, task=task, workers=workers, rounds=rounds, seed=0,
                          run_id=f"byz-{case.recipe}")
    names = [f"w{i}" for i in range(workers)]
    bad = names[workers - case.attackers:] if case.attack != "none" else []
    box: dict[str, "Worker"] = {}

    def keep(ws: list["Worker"]) -> None:
        box.update({w.name: w for w in ws})

    transforms = {n: make_attack(case.attack, 1000 + i, lambda: [box[h] for h in names if h not in bad],
                                 lambda n=n: box[n]) for i, n in enumerate(bad)}
    started = time.perf_counter()
    res = simulate(cfg, eval_every=max(1, rounds // evals), transforms=transforms, on_workers=keep)
    flagged: dict[str, int] = {n: 0 for n in names}
    cosines: dict[str, list[float]] = {n: [] for n in names}
    evicted: dict[str, int] = {}
    for h in res.history:
        rep = h.robust or {}
        for n, m in rep.get("members", {}).items():
            flagged[n] += int(bool(m.get("clipped") or m.get("rejected")))
            if m.get("cosine") is not None:
                cosines[n].append(m["cosine"])
        for n in rep.get("evicted", {}):
            evicted.setdefault(n, h.round)
    honest = [n for n in names if n not in bad]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {"case": case.key, "recipe": case.recipe, "attack": case.attack, "attackers": case.attackers,
            "robust": case.robust, "overrides": overrides, "final_val_loss": res.final_val_loss,
            "replicas_identical": res.history[-1].replicas_identical, "wall_s": round(time.perf_counter() - started, 1),
            "curve": [[h.round, h.val_loss] for h in res.history if h.val_loss is not None],
            "flagged_honest": sum(flagged[n] for n in honest), "flagged_attackers": sum(flagged[n] for n in bad),
            "evicted": evicted, "cosine_honest": mean([c for n in honest for c in cosines[n]]),
            "cosine_attackers": mean([c for n in bad for c in cosines[n]])}


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {r["case"]: r for r in rows}
    lines = [f"Command: `{meta['command']}`", f"Machine: {meta['machine']}", f"Commit: {meta['commit']}, "
             f"date: {meta['date']}", f"Setup: {meta['setup']}", ""]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        clean = by.get(f"{recipe}/none/0/off")
        base = clean["final_val_loss"] if clean else math.nan
        lines += [f"**{recipe}** — clean run: {_fmt(base, '.4f')} nats; with the robust settings: "
                  f"{_fmt(by.get(f'{recipe}/none/0/on', {}).get('final_val_loss'), '.4f')} "
                  f"(cost {_fmt(by.get(f'{recipe}/none/0/on', {}).get('final_val_loss', math.nan) - base, '+.4f')})",
                  "", "| attack | attackers | robust off: val loss (Δ) | robust on: val loss (Δ) | attackers' frames "
                  "flagged (on) | honest frames flagged (on) | evicted (on, round) |",
                  "|---|---|---|---|---|---|---|"]
        keys = dict.fromkeys((r["attack"], r["attackers"]) for r in rows if r["recipe"] == recipe and r["attackers"])
        for attack, m in keys:
            off, on = by.get(f"{recipe}/{attack}/{m}/off"), by.get(f"{recipe}/{attack}/{m}/on")

            def cell(r: dict[str, Any] | None) -> str:
                return "not run" if r is None else (f"{_fmt(r['final_val_loss'], '.4f')} "
                                                     f"({_fmt(r['final_val_loss'] - base, '+.3f')})")
            ev = ", ".join(f"{n}@{k}" for n, k in sorted(on["evicted"].items())) if on and on["evicted"] else "—"
            lines.append(f"| {attack} | {m} | {cell(off)} | {cell(on)} | {on['flagged_attackers'] if on else '—'} | "
                         f"{on['flagged_honest'] if on else '—'} | {ev} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    by = {r["case"]: r for r in rows}
    fig, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 4.5), squeeze=False)
    series = [("off", 1, "robust off, 1 attacker"), ("off", 2, "robust off, 2 attackers"),
              ("on", 1, "robust on, 1 attacker"), ("on", 2, "robust on, 2 attackers")]
    for ax, recipe in zip(axes[0], recipes):
        base = by.get(f"{recipe}/none/0/off", {}).get("final_val_loss", math.nan)
        attacks = ["none"] + [a for a in ATTACKS if any(r["attack"] == a and r["recipe"] == recipe for r in rows)]
        width = 0.8 / len(series)
        for j, (setting, m, label) in enumerate(series):
            ys = []
            for a in attacks:
                r = by.get(f"{recipe}/none/0/{setting}") if a == "none" else by.get(f"{recipe}/{a}/{m}/{setting}")
                ys.append(r["final_val_loss"] - base if r else math.nan)
            ax.bar([i + (j - 1.5) * width for i in range(len(attacks))], ys, width, label=label)
        ax.set_xticks(range(len(attacks)), ["clean"] + attacks[1:])
        ax.set_yscale("symlog", linthresh=0.1)
        ax.axhline(0.1, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{recipe}: final val loss − clean run (nats)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue(), durable=False)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=False).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_byzantine_bench(out: Path, recipes: Sequence[str] = RECIPES, attacks: Sequence[str] = ATTACKS,
                        attackers: Sequence[int] = (1, 2), robust: str = "both",
                        plain_attackers: Sequence[int] | None = None, *, workers: int = 8, rounds: int = 40,
                        H: int = 16, inner_lr: float = 2e-3, size: str = "tiny", batch_size: int = 8,
                        eval_batches: int = 32, evals: int = 4, command: str = "") -> list[dict[str, Any]]:
    """Run the grid (``cases``), skipping cases already in DIR/results.json; returns every row."""
    commit = _commit()  # the code that runs (HEAD may move while a long benchmark runs)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    done = {r["case"] for r in rows}
    grid = cases(recipes, attacks, attackers, robust, plain_attackers)
    for case in progress_iter([c for c in grid if c.key not in done], "bench byzantine", unit="cases"):
        log.info("bench byzantine: %s ...", case.key)
        row = run_case(case, workers=workers, rounds=rounds, H=H, inner_lr=inner_lr, size=size,
                       batch_size=batch_size, eval_batches=eval_batches, evals=evals)
        rows.append(row)
        log.info("bench byzantine: %s final val %.4f (%.0f s)", case.key, row["final_val_loss"], row["wall_s"])
        write_atomic(path, json.dumps(rows, indent=1))
    meta = {"command": command or "lowband bench byzantine", "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "setup": f"gpt {size}, batch {batch_size}, {workers} workers, H {H}, {rounds} rounds, inner lr {inner_lr}, "
                     f"eval on {eval_batches} batches, seed 0"}
    order = {c.key: i for i, c in enumerate(grid)}
    rows.sort(key=lambda r: order.get(r["case"], len(order)))
    write_atomic(out / "results.md", markdown(rows, meta))
    plot(rows, out / "byzantine.png")
    print(markdown(rows, meta))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/bench-byzantine",
                   help="results.json (a rerun skips the cases there), results.md and byzantine.png go here")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipes to attack")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS,
                   help="attacks by the hostile members (node/bench/attacks.py)")
    p.add_argument("--attackers", nargs="+", type=positive_int, default=[1, 2], help="hostile member counts")
    p.add_argument("--plain-attackers", nargs="+", type=positive_int, default=None,
                   help="attacker counts also run without robust settings (default: every count)")
    p.add_argument("--robust", choices=("both", "on", "off"), default="both",
                   help="run the attacks with the recommended [recipe.reduce] settings, without, or both")
    p.add_argument("--workers", type=positive_int, default=8, help="members of each run, hostile ones included")
    p.add_argument("--rounds", type=positive_int, default=40, help="rounds per run")
    p.add_argument("--H", type=positive_int, default=16, help="inner steps per round")
    p.add_argument("--inner-lr", type=float, default=2e-3, help="inner optimizer learning rate")
    p.add_argument("--size", default="tiny", help="gpt size: tiny, small, medium, gpt2")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per inner step")


def add_parser(bench: Any) -> None:
    """``lowband bench byzantine``: its parser under ``bench`` (the ``bench`` subparsers of node/cli.py)."""
    p = bench.add_parser("byzantine", help="1 or 2 hostile members of 8, with and without robust reduce settings")
    add_arguments(p)
    p.set_defaults(func=cmd_bench_byzantine)


def cmd_bench_byzantine(args: argparse.Namespace) -> int:
    """The command (named cmd_bench_* so that node/cli.py treats it as a benchmark: SIGTERM unwinds it)."""
    import sys

    return run_from_args(args, "lowband " + " ".join(sys.argv[1:]))


def run_from_args(args: argparse.Namespace, command: str) -> int:
    run_byzantine_bench(Path(args.out), args.recipes, args.attacks, args.attackers, args.robust, args.plain_attackers,
                        workers=args.workers, rounds=args.rounds, H=args.H, inner_lr=args.inner_lr, size=args.size,
                        batch_size=args.batch_size, command=command)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m node.bench.byzantine ...`` (the same as ``lowband bench byzantine ...``)."""
    import sys

    p = argparse.ArgumentParser(prog="lowband bench byzantine", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run_from_args(args, "lowband bench byzantine " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
