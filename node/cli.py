"""lowband trains one PyTorch model on machines spread over slow, lossy internet links. Each node trains on its own
for H steps, then exchanges a compressed update (1-bit signs or DCT-top-k: 30-140x smaller than dense fp32) with the
others, through a coordinator (`lowband coordinator` + `lowband node`) or with no server at all over a DHT
(`lowband dht` + `lowband node --dht`). Try it on this machine: `lowband demo`.

Watch a run: `lowband status`, the coordinator's dashboard (--http-port) and Prometheus metrics (--metrics-port);
docs/operations.md. Every command has --help.
"""
# The ``lowband`` command line. Logging is configured here and only here.
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from node.cli_bench import add_bench_parser
from node.cli_checks import (EXIT_CODES, UNREACHABLE_EXIT, CoordinatorUnreachable, Parser, coordinator_address,
                             port_number, positive_int, wait_for_coordinator)
from node.cli_trust import (add_certs_parser, add_client_tls_args, add_coordinator_args, client_tls, cmd_coordinator,
                            node_exit_code, node_security, read_token)
from node.config import TaskConfig, parse_value
from node.dht_cli import add_run_parser, add_status_dht_args, announce_maddrs
from node.errors import ConfigError
from node.fsutil import write_atomic

if TYPE_CHECKING:
    from node.transport.state_prefetch import StatePrefetch

log = logging.getLogger("lowband")


class _RecipeNames:
    """argparse ``choices`` that import the recipes (and so torch) only when a command reads a recipe name:
    ``lowband node`` must start its state download before paying for torch's import (see cmd_node)."""

    def _names(self) -> list[str]:
        from node.recipes import RECIPES

        return sorted(RECIPES)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._names())


RECIPE_NAMES = _RecipeNames()
# a metavar keeps argparse from listing the choices while it builds the parser (that would import them)
RECIPE_HELP = "a name from node/recipes.py (an unknown name lists them)"


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if not verbose:  # gRPC core's own INFO lines (one per failed TLS handshake) only with -v; before grpc loads
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def _add_run_args(p: argparse.ArgumentParser, rounds: int) -> None:
    p.add_argument("--recipe", default="sign", choices=RECIPE_NAMES, metavar="RECIPE",
                   help="algorithm preset: " + RECIPE_HELP)
    p.add_argument("--workers", type=positive_int, default=4, help="workers trained in this process")
    p.add_argument("--rounds", type=positive_int, default=rounds, help="rounds to run")
    p.add_argument("--H", type=positive_int, default=None, help="inner steps per round (default: the recipe's)")
    p.add_argument("--task", default="gpt", help="'gpt' or package.module:function")
    p.add_argument("--size", default="tiny", help="gpt size: tiny, small, medium, gpt2")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per inner step")
    p.add_argument("--seed", type=int, default=0, help="initial parameters and data order")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe/run field, e.g. --set codec.k=16 --set inner.lr=1e-3 (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")


def _run_config(args: argparse.Namespace):
    overrides = _overrides(args.sets)
    if args.H is not None:
        overrides.setdefault("H", args.H)
    task_params: dict[str, Any] = {"batch_size": args.batch_size}
    if args.task == "gpt":
        task_params["size"] = args.size
    from node.recipes import make_run_config

    return make_run_config(args.recipe, overrides, task=TaskConfig(args.task, task_params), workers=args.workers,
                           rounds=args.rounds, seed=args.seed)


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_simulate(args: argparse.Namespace) -> int:
    from node.train.simulate import simulate

    cfg = _run_config(args)
    H = cfg.recipe.H
    log.info("simulate: recipe=%s workers=%d rounds=%d H=%d codec=%s outer=%s", cfg.recipe.name, cfg.workers,
             cfg.rounds, H, cfg.recipe.codec.name, cfg.recipe.outer.name)
    result = simulate(cfg, device=_device(args.device), eval_every=args.eval_every, result=args.result,
                      aggregate_codec=args.aggregate_codec)
    summary = {k: v for k, v in result.to_dict().items() if k != "history"}
    print(json.dumps(summary, indent=2))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result.to_dict(), indent=2), durable=False)
        log.info("wrote %s", path)
    return 0


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def cmd_node(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # N processes: this command again under torchrun
        from node.train.local_group import exec_torchrun
        exec_torchrun(args.nproc, sys.argv[1:])
    if bool(args.dht) == bool(args.coordinator):
        raise ConfigError("give either --coordinator HOST:PORT or --dht --initial-peers MADDR[,MADDR...]")
    if args.coordinator:
        args.coordinator = coordinator_address(args.coordinator)
    join_token = args.join_token or os.environ.get("LOWBAND_JOIN_TOKEN", "")
    tls = node_security(args)
    leader = os.environ.get("LOCAL_RANK", "0") == "0"  # under torchrun only local rank 0 talks to the run
    metrics = _node_metrics(args) if leader else None  # the node's rounds are rank 0's
    try:
        if args.coordinator:
            wait_for_coordinator(args.coordinator, tls, args.connect_timeout, ca_path=args.tls_ca or "")
    except CoordinatorUnreachable as exc:
        print(f"lowband node: giving up: {exc}", file=sys.stderr)
        return UNREACHABLE_EXIT
    try:
        if args.coordinator and leader and not (Path(args.workdir) / "checkpoint.safetensors").exists():
            # a fresh node: download the run's state while torch imports and the model builds (seconds on a slow
            # CPU), signed by the node's key (created here on first start)
            from node.identity import NodeKey
            from node.transport.state_prefetch import StatePrefetch

            prefetch = StatePrefetch(args.coordinator, join_token, key=NodeKey.load_or_create(args.workdir), tls=tls)
            try:
                return _run_node(args, join_token, prefetch, tls, metrics)
            finally:
                prefetch.cancel()
        return _run_node(args, join_token, None, tls, metrics)
    except Exception as exc:
        code = node_exit_code(exc)
        if code is None:
            raise
        return code


def _node_metrics(args: argparse.Namespace) -> Any:
    """``--metrics-port``: the node's Prometheus exporter (node/metrics.py), serving from now on; None when off."""
    if args.metrics_port is None:
        return None
    from node.metrics import NodeMetrics

    metrics = NodeMetrics(args.name or "")
    try:
        port = metrics.serve(args.metrics_host, args.metrics_port)
    except OSError as exc:
        raise ConfigError(f"--metrics-port: cannot serve on {args.metrics_host}:{args.metrics_port}: "
                          f"{exc.strerror or exc}") from None
    host = args.metrics_host if ":" not in args.metrics_host else f"[{args.metrics_host}]"
    print(f"lowband node metrics on http://{host}:{port}/metrics", file=sys.stderr, flush=True)
    return metrics


def _run_node(args: argparse.Namespace, join_token: str, prefetch: StatePrefetch | None, tls: Any,
              metrics: Any = None) -> int:
    from node.daemon import NodeOptions, run_node

    expected, dht = None, None
    if args.run:
        from node.runfile import load_run_file

        run_file = load_run_file(args.run)
        expected = run_file.run
    if args.dht:
        from node.dht_cli import dht_settings

        dht = dht_settings(args, run_file if args.run else None)
    return run_node(NodeOptions(args.coordinator or "", Path(args.workdir), args.name or "", args.device, expected,
                                join_token, args.max_rounds, dht=dht, checkpoint_every=args.checkpoint_every,
                                prefetch=prefetch, tls=tls, on_record=metrics.observe if metrics else None))


def cmd_export(args: argparse.Namespace) -> int:
    """The run's reference → a safetensors state_dict of the task's model (node/train/export.py)."""
    if bool(args.workdir) == bool(args.state_dir):
        raise ConfigError("give either --workdir DIR (a node's checkpoint) or --state-dir DIR (a coordinator's state)")
    from node.train import export

    if args.workdir:
        try:
            source = export.checkpoint_bytes(Path(args.workdir))
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
    else:
        from coordinator.replay import state_bytes  # the command line is where node and coordinator meet
        from coordinator.store import Store

        state_dir = Path(args.state_dir)
        if not (state_dir / "coordinator.sqlite").is_file():
            raise ConfigError(f"{state_dir} is not a coordinator state dir (no coordinator.sqlite)")
        committed, source = state_bytes(Store(state_dir))
        if source is None:
            raise ConfigError(f"{state_dir} holds no committed round yet: there is nothing but the seeded model")
    try:
        print(json.dumps(export.export(source, Path(args.out))))
    except ValueError as exc:  # StateFormatError: not a lowband state or checkpoint this task's model takes
        raise ConfigError(str(exc)) from None
    return 0


def cmd_dht(args: argparse.Namespace) -> int:
    from node.dht_peer import run_dht_peer

    return run_dht_peer(_split(args.listen), _split(args.initial_peers), args.identity, args.no_nat,
                        args.client_mode, announce_maddrs(args.announce))


def _add_dht_args(p: argparse.ArgumentParser, listen: str) -> None:
    p.add_argument("--listen", default=listen, help="libp2p multiaddr(s) to listen on, comma-separated "
                   f"(default {listen}; port 0 picks a free one)")
    p.add_argument("--announce", default="", help="multiaddr(s) the other peers should dial, comma-separated, each "
                   "with an explicit port (e.g. a forwarded public port); default: the listen addresses")
    p.add_argument("--identity", default=None, help="private key file: a stable peer id (created if missing)")
    p.add_argument("--no-nat", action="store_true", help="no NAT traversal (port mapping, AutoNAT, relays); "
                   "always off when listening on 127.0.0.1 only")
    p.add_argument("--client-mode", action="store_true", help="hivemind client mode, for a peer others cannot dial "
                   "(behind NAT): it stores no DHT records and is reached through libp2p relays")


def cmd_status(args: argparse.Namespace) -> int:
    if args.dht:  # serverless: read the run's records from the DHT
        from node.dht_cli import cmd_status_dht

        return cmd_status_dht(args)
    if not args.coordinator:
        raise ConfigError("give --coordinator HOST:PORT, or --dht --initial-peers MADDR --run RUN.toml")
    args.coordinator = coordinator_address(args.coordinator)
    from node.status import print_status

    return print_status(args.coordinator, as_json=args.json, read_token=read_token(args),
                        tls=client_tls(args, args.coordinator), ca_path=args.tls_ca or "")


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import check_demo, run_demo

    check_demo(args.recipe, args.nodes, args.rounds, args.H)  # a ConfigError before any process starts

    return run_demo(recipe=args.recipe, nodes=args.nodes, rounds=args.rounds, H=args.H, workdir=args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lowband", description=__doc__, epilog=EXIT_CODES)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("--task-path", action="append", default=[], metavar="DIR",
                        help="a directory to import --task modules from (before PYTHONPATH; repeatable, docs/tasks.md)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser("simulate", help="N workers in one process through the in-process transport")
    _add_run_args(sim, rounds=12)
    sim.add_argument("--eval-every", type=int, default=0, help="evaluate every K rounds (0: only at the end)")
    sim.add_argument("--json", default=None, help="write the full result (with per-round history) here")
    sim.add_argument("--result", default="relay", choices=["relay", "aggregate", "compressed"],
                     help="as a run file's [rounds] result: relay every frame, one reduced dense frame, or one "
                          "reduced frame in the run's codec with the coordinator's error feedback")
    sim.add_argument("--aggregate-codec", default="identity", choices=["identity", "bf16", "fp16"],
                     help="with --result aggregate: the dense codec of the reduced frame")
    sim.set_defaults(func=cmd_simulate)

    demo = sub.add_parser("demo", help="a coordinator and 3 nodes as separate processes on 127.0.0.1")
    demo.add_argument("--recipe", default="sign", choices=RECIPE_NAMES, metavar="RECIPE",
                      help="algorithm preset: " + RECIPE_HELP)
    demo.add_argument("--nodes", type=positive_int, default=3, help="nodes to start")
    demo.add_argument("--rounds", type=positive_int, default=12, help="rounds in the run")
    demo.add_argument("--H", type=positive_int, default=16, help="inner steps per round")
    demo.add_argument("--workdir", default=None, help="keep logs, state and plot here (default: a temp dir)")
    demo.set_defaults(func=cmd_demo)

    co = sub.add_parser("coordinator", help="serve a run over gRPC")
    co.add_argument("--listen", default="0.0.0.0:7070", help="HOST:PORT for gRPC; port 0 picks a free one (printed, "
                    "and remembered in the state dir: the same command binds it again after a restart)")
    co.add_argument("--state-dir", required=True, help="persistent state (survives kill -9)")
    co.add_argument("--run", required=True, help="the run file (TOML), see deploy/runs/")
    co.add_argument("--http-port", type=port_number, default=None, metavar="PORT",
                    help="serve the live dashboard on this port (0: a free one, printed); off when not given")
    co.add_argument("--http-host", default=None, metavar="HOST",
                    help="the dashboard's address (default: the --listen host); off loopback it needs TLS")
    co.add_argument("--metrics-port", type=port_number, default=None, metavar="PORT",
                    help="serve Prometheus metrics at /metrics on this port (0: a free one, printed); off when not "
                         "given (the dashboard's port serves /metrics too)")
    co.add_argument("--metrics-host", default=None, metavar="HOST", help="the metrics' address (default: the "
                    "--listen host); off loopback it needs TLS")
    co.add_argument("--torch-threads", type=positive_int, default=1, metavar="N",
                    help="threads of the coordinator's torch work (reduce, outer step, evaluation), intra- and "
                         "inter-op each; default 1: more oversubscribes cores shared with gRPC and nodes (raise it on "
                         "a dedicated many-core host)")
    add_coordinator_args(co)
    co.set_defaults(func=cmd_coordinator)

    add_certs_parser(sub)
    nd = sub.add_parser("node", help="a worker that joins a coordinator's run, or a serverless run over a DHT")
    nd.add_argument("--coordinator", default=None, help="HOST:PORT of the coordinator (what it printed at start)")
    nd.add_argument("--dht", action="store_true", help="serverless: agree on the run and exchange through a DHT")
    nd.add_argument("--initial-peers", default=None, help="with --dht: bootstrap multiaddr(s), comma-separated")
    _add_dht_args(nd, "/ip4/0.0.0.0/tcp/0")
    nd.add_argument("--workdir", required=True, help="checkpoint and round log (resume on restart)")
    nd.add_argument("--name", default=None, help="unique node name (default: hostname-pid)")
    nd.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where to train (auto: cuda when available)")
    nd.add_argument("--run", default=None, help="refuse to join unless the run is exactly this run file "
                    "(required with --dht)")
    nd.add_argument("--join-token", default=None, help="the run's join token (or $LOWBAND_JOIN_TOKEN)")
    nd.add_argument("--max-rounds", type=positive_int, default=None, help="leave after applying this many rounds")
    nd.add_argument("--checkpoint-every", type=positive_int, default=1, metavar="N",
                    help="write the checkpoint every N applied rounds (and on exit); a node restarted from an "
                         "older checkpoint fetches the run's state. Each write costs a full state snapshot")
    nd.add_argument("--nproc", type=int, default=1, metavar="N", help="N local processes train one replica (DDP)")
    nd.add_argument("--state-chunk-bytes", type=int, default=4 << 20,
                    help="with --dht: a joiner fetches the state in chunks of this size, spread over the donors")
    nd.add_argument("--connect-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="give up (exit 5) when the coordinator has not answered this long at start, with a "
                         "countdown on stderr meanwhile; 0: never give up. Once joined, a node rides out coordinator "
                         "restarts however long they take")
    nd.add_argument("--metrics-port", type=port_number, default=None, metavar="PORT",
                    help="serve Prometheus metrics at /metrics on this port (0: a free one, printed); off when not "
                         "given")
    nd.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                    help="the metrics' address (this node's own losses and bytes, no credential; 0.0.0.0 exposes "
                         "them to the network)")
    add_client_tls_args(nd)
    nd.set_defaults(func=cmd_node)

    dh = sub.add_parser("dht", help="a DHT bootstrap peer for serverless runs (prints its multiaddrs)")
    _add_dht_args(dh, "/ip4/0.0.0.0/tcp/7071")
    dh.add_argument("--initial-peers", default=None, help="other DHT peers to join, comma-separated")
    dh.set_defaults(func=cmd_dht)

    ex = sub.add_parser("export", help="the run's model as a safetensors state_dict (model.load_state_dict(...))")
    ex.add_argument("--workdir", default=None, help="a node's workdir: its checkpoint's reference")
    ex.add_argument("--state-dir", default=None, help="a coordinator's state dir: its last committed state")
    ex.add_argument("--out", required=True, help="the .safetensors file to write")
    ex.set_defaults(func=cmd_export)

    st = sub.add_parser("status", help="members, round, deadline, bytes and loss of a running coordinator, or of a "
                        "serverless run (--dht)")
    st.add_argument("--coordinator", default=None, help="HOST:PORT of the coordinator")
    st.add_argument("--json", action="store_true", help="print the status view as JSON (numbers as numbers, "
                    "NaN as null)")
    st.add_argument("--read-token", default=None, help="the run's read or join token (or $LOWBAND_READ_TOKEN, "
                    "$LOWBAND_JOIN_TOKEN)")
    add_client_tls_args(st)
    add_status_dht_args(st)
    st.set_defaults(func=cmd_status)

    add_run_parser(sub)
    add_bench_parser(sub, RECIPE_NAMES)
    return parser


def _interrupt_on_sigterm() -> None:
    """A benchmark owns processes, namespaces and cgroups: SIGTERM (``kill``, a CI timeout) unwinds it like
    Ctrl-C, so its ``finally`` blocks stop and remove them instead of leaving them behind."""
    import signal

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    for path in reversed(args.task_path):  # first given, first searched; a task module can then be imported
        sys.path.insert(0, str(Path(path).resolve()))
    if args.func.__name__.startswith("cmd_bench"):
        _interrupt_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"lowband {args.command}: configuration error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`lowband status | head`): no traceback, nothing more to write
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0

if __name__ == "__main__":
    sys.exit(main())
