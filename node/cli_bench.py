"""``lowband bench ...``: the benchmarks' command line (node/cli.py adds it). Each bench shows its progress (a bar on a
terminal, a line with an ETA otherwise: node/progress.py) and writes its results where ``--out`` says."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from node.bench.byzantine import add_parser as add_byzantine_parser
from node.cli_checks import positive_int
from node.errors import ConfigError

RECIPE_HELP = "a name from node/recipes.py (an unknown name lists them)"


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from node.bench.quality import collect_results, run_quality_bench

    try:
        if args.collect:
            collect_results([Path(f) for f in args.collect], Path(args.out), "lowband " + " ".join(sys.argv[1:]),
                            baseline=args.baseline)
            return 0
        run_quality_bench(args.profile, Path(args.out), recipes=args.recipes, device=_device(args.device),
                          command="lowband " + " ".join(sys.argv[1:]), variants=args.variant, jobs=args.jobs)
    except ConfigError as exc:
        print(f"lowband bench quality: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_bench_codecs(args: argparse.Namespace) -> int:
    from node.bench.codecs import run_codec_bench

    run_codec_bench(size=args.size, repeats=args.repeats, out=Path(args.out) if args.out else None,
                    numel=args.numel, codecs=args.codecs, reduce_members=args.reduce_members or 0)
    return 0


def cmd_bench_commit(args: argparse.Namespace) -> int:
    from node.bench.commit import run_commit_bench

    run_commit_bench(args.n_layer, args.n_embd, args.n_head, args.members, args.rounds,
                     Path(args.out) if args.out else None, args.result)
    return 0


def cmd_bench_coordinator(args: argparse.Namespace) -> int:
    from node.bench.coordinator import run_coordinator_bench

    try:
        run_coordinator_bench(args.nodes, args.rounds, args.recipe, args.size, Path(args.out) if args.out else None,
                              tls=args.tls, result=args.result, aggregate_codec=args.aggregate_codec,
                              torch_threads=args.torch_threads, max_nodes=args.max_nodes, keep=args.keep)
    except ValueError as exc:
        print(f"lowband bench coordinator: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_bench_join(args: argparse.Namespace) -> int:
    from node.bench.join import run_join_bench

    run_join_bench(size=args.size, recipe=args.recipe, H=args.H, batch=args.batch_size, dht=args.dht,
                   donors=args.donors)
    return 0


def cmd_bench_exchange(args: argparse.Namespace) -> int:
    from node.bench.exchange import run_exchange_bench

    run_exchange_bench(args.peers, args.recipes, args.size, args.rounds, args.modes,
                       Path(args.out) if args.out else None)
    return 0


def cmd_bench_network(args: argparse.Namespace) -> int:
    from node.bench.network import run_network_bench

    overlaps = {"both": [False, True], "on": [True], "off": [False]}[args.overlap]
    run_network_bench(args.recipes, args.profiles, overlaps, nodes=args.nodes, size=args.size, H=args.H,
                      batch=args.batch_size, rounds=args.rounds, warm=args.warm, join=not args.no_join,
                      out=Path(args.out) if args.out else None, netns={"auto": None, "on": True, "off": False}[args.netns],
                      cpu_per_node=args.cpu_per_node, checkpoint_every=args.checkpoint_every, result=args.result)
    return 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from node.bench.scale import ScaleSettings, run_scale_bench, write_report

    out = Path(args.out)
    settings = ScaleSettings(size=args.size, rounds=args.rounds, load_procs=args.load_procs, recipe=args.recipe,
                             relay_max_nodes=args.relay_max_nodes, round_timeout_s=args.round_timeout,
                             heartbeat_s=args.heartbeat, keep_results=args.keep_results,
                             aggregate_codec=args.aggregate_codec,
                             coordinator_args=tuple(a for arg in args.coordinator_arg for a in arg.split()))
    command = "lowband " + " ".join(sys.argv[1:])
    if args.dht:
        try:
            from node.bench.scale_dht import run_dht_scale
        except ImportError as exc:
            print(f"lowband bench scale --dht: the serverless side (node/bench/scale_dht.py) is not in this tree "
                  f"({exc})", file=sys.stderr)
            return 2
        from node.bench.scale_report import ScaleRow

        rows = [ScaleRow.from_mapping(d) for d in run_dht_scale(args.peers, args.size, args.rounds, out, args.keep)]
        write_report(rows, out, settings, command)
        return 0
    rows = run_scale_bench(args.nodes, args.mode, settings, out, keep=args.keep, command=command)
    return 0 if any(r.measured for r in rows) else 1


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from node.bench.soak import SoakConfig, run_soak

    report = run_soak(SoakConfig(args.mode, args.nodes, args.rounds, args.events, args.coordinator_restarts,
                                 args.profile, args.seed, args.recipe, args.size, args.H,
                                 netns={"auto": None, "on": True, "off": False}[args.netns]),
                      out=Path(args.out) if args.out else None)
    print(json.dumps({k: v for k, v in report.to_dict().items() if k != "schedule"}, indent=2))
    return 0 if not report.problems else 1


def add_bench_parser(sub: Any, recipe_names: Any) -> None:
    """``lowband bench`` and its subcommands; ``recipe_names``: argparse choices that import recipes lazily."""
    def recipe(p: argparse.ArgumentParser, default: str = "sign") -> None:
        p.add_argument("--recipe", default=default, choices=recipe_names, metavar="RECIPE",
                       help="algorithm preset: " + RECIPE_HELP)

    bench = sub.add_parser("bench", help="benchmarks (results go to BENCHMARKS.md)")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    q = bsub.add_parser("quality", help="all recipes at equal tokens per worker: loss vs bytes")
    q.add_argument("--profile", default="quick", choices=["quick", "standard", "full"],
                   help="how long: quick (minutes), standard or full")
    q.add_argument("--collect", nargs="+", metavar="JSON", help="table and plot from `simulate --json` files instead")
    q.add_argument("--out", default="out/bench-quality", help="results.json, results.md and the plot go here")
    q.add_argument("--recipes", nargs="*", default=None, help="subset of recipes (default: all)")
    q.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    q.add_argument("--variant", action="append", default=[], metavar="RECIPE:KEY=VAL[,KEY=VAL]",
                   help="an extra row: a recipe with overrides, e.g. sign:outer.lr=8 (repeatable)")
    q.add_argument("--baseline", default="diloco", metavar="LABEL",
                   help="with --collect: the row (a file's stem) Δ and byte ratios are taken against (default diloco)")
    q.add_argument("--jobs", type=positive_int, default=1,
                   help="runs at once, each a process with one torch thread (2 on a 2-core box: the standard profile "
                        "in about half the time); the results do not depend on it")
    q.set_defaults(func=cmd_bench_quality)
    add_byzantine_parser(bsub)
    c = bsub.add_parser("codecs", help="encode+decode throughput and bits/param of every codec")
    c.add_argument("--size", default="medium", help="gpt size whose tensors are encoded (medium ≈ 25M params)")
    c.add_argument("--numel", type=positive_int, default=None,
                   help="encode one flat tensor of this many elements instead of the model's tensors")
    c.add_argument("--codecs", nargs="+", default=None, choices=["identity", "bf16", "sign", "dct_topk"],
                   metavar="NAME", help="only these codecs: identity, bf16, sign, dct_topk (default: all)")
    c.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions per codec (median reported)")
    c.add_argument("--reduce-members", type=positive_int, default=None, metavar="M",
                   help="also time the codec's reduce of M payloads per tensor (a coordinator's round)")
    c.add_argument("--out", default=None, help="write results.json here (default: print only)")
    c.set_defaults(func=cmd_bench_codecs)
    bc = bsub.add_parser("coordinator", help="round latency and overhead of the gRPC coordinator on loopback")
    bc.add_argument("--nodes", type=positive_int, nargs="+", default=[3, 16], help="node counts to measure")
    bc.add_argument("--rounds", type=positive_int, default=10, help="measured rounds per node count")
    recipe(bc)
    bc.add_argument("--size", default="tiny", help="gpt size: tiny, small, medium, gpt2")
    bc.add_argument("--out", default=None, help="write the results (JSON) here (default: print only)")
    bc.add_argument("--tls", action="store_true", help="the coordinator serves TLS (a throwaway CA), as off loopback")
    bc.add_argument("--result", default="relay", choices=["relay", "aggregate"],
                    help="the run's result mode: relay every payload, or aggregate at the coordinator")
    bc.add_argument("--aggregate-codec", default="identity", choices=["identity", "bf16", "fp16"],
                    help="with --result aggregate: the dense frame's codec")
    bc.add_argument("--torch-threads", type=positive_int, default=1, metavar="N",
                    help="the coordinator's --torch-threads")
    bc.add_argument("--max-nodes", type=positive_int, default=None, metavar="N",
                    help="the run's membership.max_nodes (default: the largest --nodes)")
    bc.add_argument("--keep", action="store_true",
                    help="keep the temporary state directories (default: removed at the end, also on error)")
    bc.set_defaults(func=cmd_bench_coordinator)
    bm = bsub.add_parser("commit", help="the coordinator's commit path and peak RSS for a large model (in-process)")
    bm.add_argument("--n-layer", type=positive_int, default=24, help="gpt layers (24 × width 1024 ≈ 300M parameters)")
    bm.add_argument("--n-embd", type=positive_int, default=1024, help="gpt width")
    bm.add_argument("--n-head", type=positive_int, default=16, help="gpt attention heads (divides the width)")
    bm.add_argument("--members", type=positive_int, default=3, help="members submitting sign frames")
    bm.add_argument("--rounds", type=positive_int, default=4, help="rounds committed (a snapshot every 2)")
    bm.add_argument("--result", choices=("relay", "aggregate", "compressed"), default="relay",
                    help="[rounds] result: with aggregate or compressed the round is reduced frame by frame as its "
                         "frames are accepted (docs/state.md), off the commit path")
    bm.add_argument("--out", default=None, help="write the results (JSON) here (default: print only)")
    bm.set_defaults(func=cmd_bench_commit)
    bj = bsub.add_parser("join", help="time from `lowband node` start to its first committed contribution")
    bj.add_argument("--size", default="tiny", help="gpt size: tiny, small, medium, gpt2")
    recipe(bj)
    bj.add_argument("--H", type=positive_int, default=4, help="inner steps per round")
    bj.add_argument("--batch-size", type=positive_int, default=8, help="sequences per inner step")
    bj.add_argument("--dht", action="store_true", help="serverless: the joiner fetches the state from peers")
    bj.add_argument("--donors", type=positive_int, default=2, help="with --dht: training peers serving the state")
    bj.set_defaults(func=cmd_bench_join)
    be = bsub.add_parser("exchange", help="one round's exchange time, DHT vs coordinator mode, for N peers")
    be.add_argument("--peers", type=positive_int, nargs="+", default=[3, 8, 16], help="peer counts to measure")
    be.add_argument("--recipes", nargs="+", default=["sign", "dct-consistent"], choices=recipe_names,
                    metavar="RECIPE", help="recipes whose payloads are exchanged: " + RECIPE_HELP)
    be.add_argument("--modes", nargs="+", default=["dht", "coordinator"], choices=["dht", "coordinator"],
                    help="control planes to measure")
    be.add_argument("--size", default="medium", help="gpt size: tiny, small, medium, gpt2")
    be.add_argument("--rounds", type=positive_int, default=3, help="measured rounds per setting")
    be.add_argument("--out", default=None, help="write exchange.json here (default: print only)")
    be.set_defaults(func=cmd_bench_exchange)
    bn = bsub.add_parser("network", help="nodes behind emulated links: utilization, bytes on the wire, join time")
    bn.add_argument("--recipes", nargs="+", default=["diloco", "sign", "dct-consistent"], choices=recipe_names,
                    metavar="RECIPE", help=RECIPE_HELP)
    bn.add_argument("--profiles", nargs="+", default=["home", "cross-region"],
                    help="link profiles (node/netem/profiles.py): loopback datacenter cross-region home bad")
    bn.add_argument("--overlap", default="both", choices=["both", "on", "off"],
                    help="run with overlapped rounds, without, or both")
    bn.add_argument("--nodes", type=positive_int, default=4, help="training nodes")
    bn.add_argument("--size", default="medium", help="gpt size: tiny, small, medium, gpt2")
    bn.add_argument("--H", type=positive_int, default=8, help="inner steps per round")
    bn.add_argument("--batch-size", type=positive_int, default=1, help="sequences per inner step")
    bn.add_argument("--rounds", type=positive_int, default=6, help="measured rounds (after --warm)")
    bn.add_argument("--warm", type=int, default=2, help="rounds before measuring")
    bn.add_argument("--no-join", action="store_true", help="skip the join measurement")
    bn.add_argument("--netns", default="auto", choices=["auto", "on", "off"],
                    help="one network namespace per process with tc-shaped veths (auto: where root allows)")
    bn.add_argument("--cpu-per-node", type=float, default=None, metavar="CORES",
                    help="give each node a fixed CPU budget (a cgroup quota, root only), as if it had its own "
                         "machine of that speed: without it, nodes sharing this box's cores speed each other up "
                         "while they wait")
    bn.add_argument("--checkpoint-every", type=positive_int, default=1, metavar="N", help="the nodes' --checkpoint-every")
    bn.add_argument("--result", default="relay", choices=["relay", "aggregate", "compressed"],
                    help="the run's [rounds] result: relay every member's frame, send one reduced dense frame, or "
                         "one reduced frame in the run's codec (compressed downlink)")
    bn.add_argument("--out", default=None, help="write network.json here (default: print only)")
    bn.set_defaults(func=cmd_bench_network)
    add_scale_parser(bsub, recipe)
    bs = bsub.add_parser("soak", help="a long run under seeded churn, then its invariants (exit 1 on a violation)")
    bs.add_argument("--mode", default="coordinator", choices=["coordinator", "dht"], help="control plane")
    bs.add_argument("--nodes", type=positive_int, default=6, help="training nodes")
    bs.add_argument("--rounds", type=positive_int, default=100, help="rounds in the run")
    bs.add_argument("--events", type=int, default=20, help="node churn events (kills, pauses, joins, a partition)")
    bs.add_argument("--coordinator-restarts", type=int, default=2, help="coordinator kill -9 and restarts")
    bs.add_argument("--profile", default="home", help="link profile of every node (node/netem/profiles.py)")
    bs.add_argument("--seed", type=int, default=1, help="seed of the churn schedule")
    recipe(bs)
    bs.add_argument("--size", default="tiny", help="gpt size: tiny, small, medium, gpt2")
    bs.add_argument("--H", type=positive_int, default=4, help="inner steps per round")
    bs.add_argument("--netns", default="auto", choices=["auto", "on", "off"],
                    help="DHT mode: a network namespace and tc-shaped link per peer (auto: where root allows)")
    bs.add_argument("--out", default=None, help="write the report (JSON) here (default: print only)")
    bs.set_defaults(func=cmd_bench_soak)


def add_scale_parser(bsub: Any, recipe: Any) -> None:
    """``lowband bench scale`` (node/bench/scale.py; ``--dht``: node/bench/scale_dht.py)."""
    sc = bsub.add_parser("scale", help="one coordinator (or serverless peers) against N simulated nodes: latency, "
                         "bytes per node, CPU and memory against N")
    sc.add_argument("--nodes", type=positive_int, nargs="+", default=[16, 64, 256], help="simulated node counts")
    sc.add_argument("--mode", nargs="+", default=["relay", "aggregate"], choices=["relay", "aggregate", "compressed"],
                    help="the run's [rounds] result: relay, aggregate, compressed (re-encoded aggregate)")
    sc.add_argument("--size", default="10m", help="gpt size: tiny, small, medium, gpt2, or 10m (medium with 3 "
                    "layers: 9,720,320 parameters)")
    sc.add_argument("--rounds", type=positive_int, default=3, help="measured rounds per setting (after one warm-up)")
    sc.add_argument("--load-procs", type=positive_int, default=4, help="load-generator processes the nodes share")
    recipe(sc)
    sc.add_argument("--relay-max-nodes", type=positive_int, default=128, metavar="N",
                    help="relay above N nodes is reported, not run (its traffic grows as N²)")
    sc.add_argument("--round-timeout", type=float, default=600.0, metavar="SECONDS",
                    help="bound of every wait of a round (and of start-up); a setting past it is reported failed")
    sc.add_argument("--heartbeat", type=float, default=5.0, metavar="SECONDS", help="the run's heartbeat_s")
    sc.add_argument("--keep-results", type=positive_int, default=8, metavar="K",
                    help="the run's [rounds] keep_results (results the coordinator holds for late collectors)")
    sc.add_argument("--aggregate-codec", default="identity", choices=["identity", "bf16", "fp16"],
                    help="aggregate mode's wire precision")
    sc.add_argument("--coordinator-arg", action="append", default=[], metavar="ARGS",
                    help="more flags for the coordinator (repeatable; split on spaces), e.g. "
                         "--coordinator-arg='--upload-read-ahead-kib 1024'")
    sc.add_argument("--dht", action="store_true", help="serverless peers instead (node/bench/scale_dht.py)")
    sc.add_argument("--peers", type=positive_int, nargs="+", default=[8, 16, 32, 64], help="with --dht: peer counts")
    sc.add_argument("--out", default="out/bench-scale", help="scale.json, scale.md and the plots go here")
    sc.add_argument("--keep", action="store_true", help="keep the temporary state dirs (default: removed)")
    sc.set_defaults(func=cmd_bench_scale)
