"""The serverless parts of the ``lowband`` command line (``node/cli.py`` calls them): ``lowband run init|grant|key``,
``lowband status --dht``, and a ``--dht`` node's identity (its run authority, key, grant and name). Nothing heavy is
imported at module level: ``lowband node`` imports this before it imports torch."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from node.errors import ConfigError
from node.fsutil import write_atomic


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def announce_maddrs(text: str) -> tuple[str, ...]:
    """``--announce``: multiaddrs with an explicit TCP/UDP port (hivemind cannot announce port 0)."""
    if not text:
        return ()
    from hivemind.utils.multiaddr import Multiaddr  # late: only DHT peers need it

    found = []
    for item in _split(text):
        try:
            maddr = Multiaddr(item)
        except Exception as exc:
            raise ConfigError(f"--announce: {item!r} is not a multiaddr ({exc})") from None
        ports = [maddr.value_for_protocol(p.name) for p in maddr.protocols() if p.name in ("tcp", "udp")]
        if not ports or "0" in [str(port) for port in ports]:
            raise ConfigError(f"--announce: {item!r} needs an explicit port (e.g. /ip4/203.0.113.7/tcp/31337)")
        found.append(item)
    return tuple(found)


def dht_settings(args: argparse.Namespace, run_file: Any) -> Any:
    """``lowband node --dht``'s ``DhtSettings``: how to reach the DHT, the run file's knobs, and the node's identity
    (``dht_identity``; ``args.name`` becomes its grant's name when none was given)."""
    from node.dht_peer import nat_enabled
    from node.transport.dht_state import MAX_CHUNK

    if run_file is None:
        raise ConfigError("--dht needs --run RUN.toml: there is no coordinator to hand out the run")
    peers, listen = _split(args.initial_peers), _split(args.listen)
    if not peers:
        raise ConfigError("--dht needs --initial-peers MADDR[,MADDR...] (e.g. from `lowband dht`)")
    if not 0 < args.state_chunk_bytes <= MAX_CHUNK:
        raise ConfigError(f"--state-chunk-bytes must be in 1..{MAX_CHUNK}, got {args.state_chunk_bytes}")
    settings, args.name = serverless_settings(
        run_file, args.run, args.workdir, args.name, peers, listen, nat_enabled(listen, args.no_nat),
        identity=args.identity, client_mode=args.client_mode, announce=announce_maddrs(args.announce),
        state_chunk_bytes=args.state_chunk_bytes)
    return settings


def serverless_settings(run_file: Any, source: str, workdir: str | Path, name: str | None, peers: Sequence[str],
                        listen: Sequence[str], nat: bool, *, identity: str | None = None, client_mode: bool = False,
                        announce: Sequence[str] = (), state_chunk_bytes: int = 4 << 20) -> tuple[Any, str | None]:
    """A serverless node's (``DhtSettings``, name): how to reach the DHT (``peers``, ``listen``, ``nat``, ...), the run
    file's membership and deadline knobs, and the node's identity (``node_identity``) — for ``lowband node --dht``
    and the Python API's ``lowband.join(dht=...)``. ``source``: where the run file came from, for messages."""
    from node.transport.dht_control import DhtSettings

    mp = run_file.membership
    authority, key, grant, name = node_identity(run_file, source, workdir, name)
    return DhtSettings(tuple(peers), tuple(listen), nat, identity, client_mode=client_mode,
                       announce_maddrs=tuple(announce), num_shards=mp.max_nodes, min_nodes=mp.min_nodes,
                       heartbeat_s=mp.heartbeat_s, round_wait_s=run_file.deadline.max_wait_s,
                       deadline=run_file.deadline, state_chunk_bytes=state_chunk_bytes, authority=authority, key=key,
                       grant=grant, sharding=run_file.dht_record(),
                       # a robust reduce needs every whole frame (norms, medians): such runs keep the all-gather
                       shard_above=(None if run_file.run.recipe.reduce.enabled or not run_file.dht.shard_above
                                    else run_file.dht.shard_above),
                       owner_wait_s=run_file.dht.owner_wait_s, aggregate_codec=run_file.aggregate_codec), name


def dht_identity(args: argparse.Namespace, run_file: Any) -> tuple[Any, Any, bytes, str | None]:
    """``node_identity`` of ``lowband node --dht``'s ``--run``, ``--workdir`` and ``--name``."""
    return node_identity(run_file, args.run, args.workdir, args.name)


def node_identity(run_file: Any, source: str, workdir: str | Path,
                  name: str | None) -> tuple[Any, Any, bytes, str | None]:
    """A serverless node's (run authority, key, grant, name): the run file's [authority], the workdir's node.key and
    grant.toml; the name defaults to the grant's."""
    from node.identity import NodeKey
    from node.transport.dht_authority import GRANT_FILE, check_grant, load_grant
    from node.transport.dht_trust import RunAuthority

    authority = RunAuthority.from_section(run_file.authority, source)
    key = NodeKey.load_or_create(workdir)
    path = Path(workdir) / GRANT_FILE
    grant = load_grant(path)
    if grant is None:
        return authority, key, b"", name
    check_grant(grant, authority, run_file.run.run_id, key, path)
    if name and name != grant.name:
        raise ConfigError(f"the name {name!r}, but {path} grants the name {grant.name!r}")
    return authority, key, grant.signature, grant.name


def cmd_run(args: argparse.Namespace) -> int:
    """``lowband run init|grant|key``: a serverless run's authority and its members' keys."""
    from node.identity import NodeKey
    from node.transport.dht_authority import GRANT_FILE, grant_text, init_run

    if args.run_command == "init":
        out = Path(args.out)
        key_path = Path(args.authority_key) if args.authority_key else out.with_suffix(".authority.key")
        got = init_run(Path(args.template), out, key_path, open_run=args.open, run_id=args.id)
        print(f"run {got.run_id}: wrote {got.run_path} (signed by authority {got.key_id}, "
              f"{'open' if args.open else 'closed'} run); authority key {got.key_path}"
              f"{' (created: keep it private)' if got.created_key else ''}")
        if not args.open:
            print(f"each node needs a grant: lowband run grant --run {got.run_path} --authority-key {got.key_path} "
                  "--workdir NODE_WORKDIR --name NAME")
        return 0
    if args.run_command == "key":
        print(NodeKey.load_or_create(args.workdir).public.hex())
        return 0
    from node.runfile import load_run_file

    run_file = load_run_file(args.run)
    key_path = Path(args.authority_key)
    if not key_path.exists():
        raise ConfigError(f"no authority key at {key_path}")
    authority = NodeKey.load_or_create(key_path.parent, key_path.name)
    if bool(args.workdir) == bool(args.public):
        raise ConfigError("give either --workdir NODE_WORKDIR (a node on this machine) or --public HEX "
                          "(`lowband run key` on the node's machine)")
    try:
        public = NodeKey.load_or_create(args.workdir).public if args.workdir else bytes.fromhex(args.public)
    except ValueError:
        raise ConfigError("--public must be the node's public key in hex (`lowband run key`)") from None
    text = grant_text(run_file, authority, public, args.name)
    if args.workdir:
        write_atomic(Path(args.workdir) / GRANT_FILE, text)
        print(f"wrote {Path(args.workdir) / GRANT_FILE}: {args.name} may join run {run_file.run.run_id}")
    else:
        print(text, end="")
    return 0


def cmd_status_dht(args: argparse.Namespace) -> int:
    from node.dht_peer import nat_enabled
    from node.runfile import load_run_file
    from node.status import dht_view, print_view
    from node.transport.dht_status import read_status

    if args.coordinator or not args.initial_peers or not args.run:
        raise ConfigError("--dht needs --initial-peers MADDR[,MADDR...] and --run RUN.toml (no --coordinator)")
    listen = _split(args.listen)
    run_file = load_run_file(args.run)
    # the coordinator's Status view (node/status.py): the same fields and table, plus what only a DHT has
    return print_view(dht_view(read_status(_split(args.initial_peers), run_file, listen, nat_enabled(listen, args.no_nat)),
                               run_file.run.recipe.name, run_file.run.rounds), args.json)


def add_status_dht_args(st: argparse.ArgumentParser) -> None:
    st.add_argument("--dht", action="store_true", help="a serverless run: read its DHT records (needs "
                    "--initial-peers and --run)")
    st.add_argument("--initial-peers", default=None, help="with --dht: a DHT peer's multiaddr(s), comma-separated")
    st.add_argument("--run", default=None, help="with --dht: the run file (its id and authority)")
    st.add_argument("--listen", default="/ip4/0.0.0.0/tcp/0", help="with --dht: this reader's listen multiaddr(s)")
    st.add_argument("--no-nat", action="store_true", help="with --dht: no NAT traversal")


def add_run_parser(sub: Any) -> None:
    ru = sub.add_parser("run", help="a serverless run's authority: sign a run file, grant nodes, show a node's key")
    rsub = ru.add_subparsers(dest="run_command", required=True)
    ri = rsub.add_parser("init", help="sign a run file as its authority (creates the authority key if missing)")
    ri.add_argument("--from", dest="template", required=True, help="a run file to start from (deploy/runs/*.toml)")
    ri.add_argument("--out", required=True, help="the signed run file to write")
    ri.add_argument("--id", default=None, help="the run id (default: the template's)")
    ri.add_argument("--authority-key", default=None, help="the authority's private key (default: OUT with suffix "
                    ".authority.key); reused when it exists")
    ri.add_argument("--open", action="store_true", help="any node with the run file may join (default: closed, "
                    "only nodes with a grant)")
    ri.set_defaults(func=cmd_run)
    rg = rsub.add_parser("grant", help="let a node's key join a closed run under a name")
    rg.add_argument("--run", required=True, help="the signed run file")
    rg.add_argument("--authority-key", required=True, help="the run's authority key")
    rg.add_argument("--name", required=True, help="the node's name in the run")
    rg.add_argument("--workdir", default=None, help="a node's workdir on this machine (its node.key is created if "
                    "missing; the grant is written there as grant.toml)")
    rg.add_argument("--public", default=None, help="a node's public key in hex (`lowband run key`); the grant is "
                    "printed")
    rg.set_defaults(func=cmd_run)
    rk = rsub.add_parser("key", help="print a node's public key (creating its node.key if missing)")
    rk.add_argument("--workdir", required=True, help="the node's workdir (its node.key)")
    rk.set_defaults(func=cmd_run)
