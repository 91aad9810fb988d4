"""``lowband status``: one look at a running coordinator (its read or join token when the run has one; TLS like a
node's). Status carries no credential material: members are shown by name and public key id.

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

from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.transport.grpc_auth import ClientTls, open_channel

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
    """Every field of ``message`` (defaults included) as plain JSON values, by the proto's field names."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        else:
            out[field.name] = _value(field, value)
    return out


def status_json(s: pb.StatusResponse) -> dict[str, Any]:
    return message_json(s)


def _f(x: float, fmt: str = ".4f") -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def status_text(s: pb.StatusResponse) -> list[str]:
    deadline = f"{s.deadline_in_s:.1f} s" if s.deadline_in_s >= 0 else "not set (no payload yet)"
    lines = [f"run {s.run_id}  recipe {s.recipe}  round {s.current_round} open  {s.committed_rounds} committed  "
             f"deadline {deadline}  fingerprint {s.reference_fingerprint}"]
    if s.persistence_error:
        lines.append(f"NOT SERVING ROUNDS: {s.persistence_error}")
    lines.append(f"submitted this round: {', '.join(s.submitted) or '-'}")
    lines.append(f"{'member':<20}{'key id':>18}{'heartbeat':>11}{'rounds':>8}{'first':>7}{'in B':>12}{'out B':>12}"
                 f"{'loss':>9}")
    for m in s.members:
        lines.append(f"{m.name:<20}{m.key_id:>18}{m.last_heartbeat_age_s:>9.1f} s{m.rounds_contributed:>8}"
                     f"{m.first_round:>7}{m.bytes_in:>12,}{m.bytes_out:>12,}{_f(m.last_loss):>9}")
    lines.append(f"{'round':>6}{'members':>9}{'bytes in':>12}{'dur s':>8}{'loss':>9}{'val':>9}  reason")
    for r in s.recent_rounds[-10:]:
        lines.append(f"{r.round:>6}{len(r.members):>9}{r.bytes_in:>12,}{r.duration_s:>8.2f}{_f(r.mean_loss):>9}"
                     f"{_f(r.val_loss):>9}  {r.reason}")
    return lines


def print_status(address: str, as_json: bool = False, read_token: str = "", tls: ClientTls | None = None) -> int:
    """Exit status: 0, or 1 (one line on stderr) when the coordinator did not answer or refused."""
    try:
        s = fetch_status(address, read_token=read_token, tls=tls)
    except grpc.RpcError as exc:
        print(f"lowband status: {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    # flushed here: a reader that went away (``| head``) is then a BrokenPipeError the command line ends quietly
    if as_json:
        print(json.dumps(status_json(s), indent=2, allow_nan=False), flush=True)
    else:
        print("\n".join(status_text(s)), flush=True)
    return 0
