"""``lowband status``: one look at a running coordinator (its read or join token when the run has one; TLS like a
node's). Status carries no credential material: members are shown by name and public key id. With the recipe's
``[recipe.reduce]`` on, each member's accountability (frames seen, clipped, rejected, norm ratio, cosine) and the
members the run evicted.

``status_json`` is the one JSON form of the ``Status`` view — ``lowband status --json`` prints it and the
coordinator's dashboard (coordinator/web.py) serves it: the proto's field names, numbers as JSON numbers (never the
strings proto3's JSON mapping makes of 64-bit integers), NaN ("not measured") as null.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from node.errors import ConfigError
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.transport.grpc_auth import ClientTls, open_channel
from node.transport.grpc_client import tls_hint

_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def fetch_status(address: str, timeout_s: float = 5.0, *, read_token: str = "",
                 tls: ClientTls | None = None) -> pb.StatusResponse:
    """One Status call (raises grpc.RpcError); ``read_token``: the run's read or join token, if it has one."""
    raw, channel = open_channel(address, tls, ())
    with raw:
        return pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(read_token=read_token), timeout=timeout_s)


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type in _FLOATS:
        x = float(value)
        return None if math.isnan(x) or math.isinf(x) else x
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.hex()
    return value  # ints stay ints, strings strings, bools bools


def message_json(message: Message) -> dict[str, Any]:
    """Every field of ``message`` (defaults included, deprecated ones left out) as plain JSON values, by the proto's
    field names."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.GetOptions().deprecated:  # e.g. MemberStatus.node_id: never set since protocol 2
            continue
        value = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        else:
            out[field.name] = _value(field, value)
    return out


def status_json(s: pb.StatusResponse) -> dict[str, Any]:
    return message_json(s)


# a DHT reader does not see the peers' robust reports (each peer's rounds.jsonl has them)
_NO_ACCOUNTABILITY = dict.fromkeys(("frames_seen", "frames_clipped", "frames_rejected", "norm_ratio", "cosine"))


def dht_view(d: Any, recipe: str, total_rounds: int | None = None) -> dict[str, Any]:
    """A serverless run's status (``node.transport.dht_status.DhtStatus``, read from its DHT records) as the
    ``Status`` view: the same fields, ``None`` where a DHT does not know (bytes, losses, deadline, fingerprint), and
    what only a DHT has: each member's ``status``, ``shard`` and ``records_ignored``, each round's ``announced``, the
    run's ``authority`` and ``open_run``, and the records this reader ignored. Accountability (``[recipe.reduce]``)
    is ``None``: each peer's ``rounds.jsonl`` has its reports."""
    committed = [r.round for r in d.rounds if r.outcome.startswith("committed")]
    open_round = next((r for r in d.rounds if r.round == d.round), None)
    return {
        "run_id": d.run_id, "recipe": recipe, "current_round": d.round, "total_rounds": total_rounds,
        "committed_rounds": max(committed) + 1 if committed else None, "deadline_in_s": None,
        "members": [{"name": m.name, "key_id": m.key_id, "last_heartbeat_age_s": m.last_heartbeat_s,
                     "rounds_contributed": None, "first_round": m.from_round, "bytes_in": None, "bytes_out": None,
                     "last_loss": None, "capabilities": [], **_NO_ACCOUNTABILITY, "status": m.status,
                     "shard": m.shard, "records_ignored": m.rejected} for m in d.members],
        "recent_rounds": [{"round": r.round, "members": list(r.members), "bytes_in": None, "bytes_out": None,
                           "duration_s": None, "mean_loss": None, "reason": r.outcome, "val_loss": None,
                           "reference_fingerprint": None, "announced": list(r.announced)} for r in d.rounds],
        "reference_fingerprint": None, "submitted": list(open_round.announced) if open_round is not None else [],
        "persistence_error": None, "evicted": None, "authority": d.authority, "open_run": d.open_run,
        "records_ignored": dict(d.rejected),
    }


def _n(x: Any, fmt: str) -> str:
    """A number of the view, formatted; ``-`` for one not known (None) or not measured (NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def status_lines(v: dict[str, Any]) -> list[str]:
    """The view as the text table of ``lowband status`` (coordinator and serverless alike)."""
    deadline = "not set (no payload yet)" if v["deadline_in_s"] is None or v["deadline_in_s"] < 0 else \
        f"{v['deadline_in_s']:.1f} s"
    if "authority" in v:
        deadline = "none (serverless)"
    total, committed = v.get("total_rounds") or None, v["committed_rounds"]
    if total is not None and committed is not None and committed >= total:
        where = f"finished: all {total} rounds committed"
    else:
        where = (f"round {_n(v['current_round'], 'd')} open  {_n(committed, 'd')}"
                 f"{f' of {total}' if total else ''} committed  deadline {deadline}")
    lines = [f"run {v['run_id']}  recipe {v['recipe']}  {where}  fingerprint {v['reference_fingerprint'] or '-'}"]
    if "authority" in v:
        lines.append(f"serverless: authority {v['authority']}, {'open' if v['open_run'] else 'closed'} run; records "
                     f"this reader ignored: {', '.join(f'{k} ({n})' for k, n in v['records_ignored'].items()) or 'none'}")
    if v["persistence_error"]:
        lines.append(f"NOT SERVING ROUNDS: {v['persistence_error']}")
    lines.append(f"submitted this round: {', '.join(v['submitted']) or '-'}")
    extra = "status" in (v["members"][0] if v["members"] else {})
    lines.append(f"{'member':<20}{'key id':>18}{'heartbeat':>11}{'rounds':>8}{'first':>7}{'in B':>12}{'out B':>12}"
                 f"{'loss':>9}" + ("  status  shard  ignored" if extra else ""))
    for m in v["members"]:
        lines.append(f"{m['name']:<20}{m['key_id']:>18}{_n(m['last_heartbeat_age_s'], '9.1f'):>9} s"
                     f"{_n(m['rounds_contributed'], 'd'):>8}{_n(m['first_round'], 'd'):>7}{_n(m['bytes_in'], ','):>12}"
                     f"{_n(m['bytes_out'], ','):>12}{_n(m['last_loss'], '.4f'):>9}"
                     + (f"  {m['status']:<7}{m['shard']:>6}{m['records_ignored']:>9}" if extra else ""))
    lines += accountability_lines(v)
    lines.append(f"{'round':>6}{'members':>9}{'bytes in':>12}{'dur s':>8}{'loss':>9}{'val':>9}  reason")
    for r in v["recent_rounds"][-10:]:
        lines.append(f"{r['round']:>6}{len(r['members']):>9}{_n(r['bytes_in'], ','):>12}{_n(r['duration_s'], '.2f'):>8}"
                     f"{_n(r['mean_loss'], '.4f'):>9}{_n(r['val_loss'], '.4f'):>9}  {r['reason']}")
    return lines


def accountability_lines(v: dict[str, Any]) -> list[str]:
    """Each member's frames seen, clipped and rejected, its latest norm ratio and cosine, and the evicted members:
    only where the run reports them (``[recipe.reduce]`` on; none in a serverless view)."""
    members, evicted = v["members"], v.get("evicted") or []
    if not any(m.get("frames_seen") for m in members) and not evicted:
        return []
    lines = [f"{'member':<20}{'frames':>8}{'clipped':>9}{'rejected':>10}{'norm ratio':>12}{'cosine':>8}"]
    for m in members:
        lines.append(f"{m['name']:<20}{m['frames_seen']:>8}{m['frames_clipped']:>9}{m['frames_rejected']:>10}"
                     f"{_n(m['norm_ratio'], '.3g'):>12}{_n(m['cosine'], '.2f'):>8}")
    lines += [f"evicted: {e['name']} at round {e['round']}: {e['reason']}" for e in evicted]
    return lines


def status_text(s: pb.StatusResponse) -> list[str]:
    return status_lines(status_json(s))


def print_view(view: dict[str, Any], as_json: bool) -> int:
    """Print a status view (flushed here: a reader that went away is a BrokenPipeError the command line ends
    quietly)."""
    if as_json:
        print(json.dumps(view, indent=2, allow_nan=False), flush=True)
    else:
        print("\n".join(status_lines(view)), flush=True)
    return 0


def print_status(address: str, as_json: bool = False, read_token: str = "", tls: ClientTls | None = None,
                 ca_path: str = "") -> int:
    """Exit status (docs/operations.md's table): 0; 5 when the coordinator did not answer (unreachable, or no answer
    in time); 3 when it refused (a missing or wrong read token); 4 for any other error status; one line on stderr
    each time. ConfigError (the command line's exit 2) for a TLS problem no retry fixes (a certificate that does not
    verify: ``tls_problem``)."""
    from node.cli_checks import tls_problem

    try:
        s = fetch_status(address, read_token=read_token, tls=tls)
    except grpc.RpcError as exc:
        problem = tls_problem(exc.details() or "", address, tls, ca_path)
        if problem:
            raise ConfigError(problem) from None
        print(f"lowband status: {address}: {exc.code().name}: {exc.details()}{tls_hint(exc, tls)}", file=sys.stderr)
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return 5
        return 3 if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) else 4
    return print_view(status_json(s), as_json)
