"""``lowband status``: one look at a running coordinator (its read or join token when the run has one; TLS like a
node's). Status carries no credential material: members are shown by name and public key id. With the recipe's
``[recipe.reduce]`` on, each member's accountability (frames seen, clipped, rejected, norm ratio, cosine) and the
members the run evicted."""
from __future__ import annotations

import json
import math
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.transport.grpc_auth import ClientTls, open_channel


def fetch_status(address: str, timeout_s: float = 5.0, *, read_token: str = "",
                 tls: ClientTls | None = None) -> pb.StatusResponse:
    """One Status call (raises grpc.RpcError); ``read_token``: the run's read or join token, if it has one."""
    raw, channel = open_channel(address, tls, ())
    with raw:
        return pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(read_token=read_token), timeout=timeout_s)


def _f(x: float, fmt: str = ".4f") -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def print_status(address: str, as_json: bool = False, read_token: str = "", tls: ClientTls | None = None) -> int:
    try:
        s = fetch_status(address, read_token=read_token, tls=tls)
    except grpc.RpcError as exc:
        print(f"lowband status: {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
                         indent=2))
        return 0
    deadline = f"{s.deadline_in_s:.1f} s" if s.deadline_in_s >= 0 else "not set (no payload yet)"
    print(f"run {s.run_id}  recipe {s.recipe}  round {s.current_round} open  {s.committed_rounds} committed  "
          f"deadline {deadline}  fingerprint {s.reference_fingerprint}")
    if s.persistence_error:
        print(f"NOT SERVING ROUNDS: {s.persistence_error}")
    print(f"submitted this round: {', '.join(s.submitted) or '-'}")
    print(f"{'member':<20}{'key id':>18}{'heartbeat':>11}{'rounds':>8}{'first':>7}{'in B':>12}{'out B':>12}"
          f"{'loss':>9}")
    for m in s.members:
        print(f"{m.name:<20}{m.key_id:>18}{m.last_heartbeat_age_s:>9.1f} s{m.rounds_contributed:>8}{m.first_round:>7}"
              f"{m.bytes_in:>12,}{m.bytes_out:>12,}{_f(m.last_loss):>9}")
    if any(m.frames_seen for m in s.members) or s.evicted:  # [recipe.reduce] on: accountability
        print(f"{'member':<20}{'frames':>8}{'clipped':>9}{'rejected':>10}{'norm ratio':>12}{'cosine':>8}")
        for m in s.members:
            print(f"{m.name:<20}{m.frames_seen:>8}{m.frames_clipped:>9}{m.frames_rejected:>10}"
                  f"{_f(m.norm_ratio, '.3g'):>12}{_f(m.cosine, '.2f'):>8}")
        for e in s.evicted:
            print(f"evicted: {e.name} at round {e.round}: {e.reason}")
    print(f"{'round':>6}{'members':>9}{'bytes in':>12}{'dur s':>8}{'loss':>9}{'val':>9}  reason")
    for r in s.recent_rounds[-10:]:
        print(f"{r.round:>6}{len(r.members):>9}{r.bytes_in:>12,}{r.duration_s:>8.2f}{_f(r.mean_loss):>9}"
              f"{_f(r.val_loss):>9}  {r.reason}")
    return 0
