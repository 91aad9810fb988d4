"""``lowband status``: one look at a running coordinator."""
from __future__ import annotations

import json
import math
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc


def fetch_status(address: str, timeout_s: float = 5.0) -> pb.StatusResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=timeout_s)


def _f(x: float, fmt: str = ".4f") -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def print_status(address: str, as_json: bool = False) -> int:
    try:
        s = fetch_status(address)
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
    print(f"submitted this round: {', '.join(s.submitted) or '-'}")
    print(f"{'member':<20}{'heartbeat':>11}{'rounds':>8}{'first':>7}{'in B':>12}{'out B':>12}{'loss':>9}")
    for m in s.members:
        print(f"{m.name:<20}{m.last_heartbeat_age_s:>9.1f} s{m.rounds_contributed:>8}{m.first_round:>7}"
              f"{m.bytes_in:>12,}{m.bytes_out:>12,}{_f(m.last_loss):>9}")
    print(f"{'round':>6}{'members':>9}{'bytes in':>12}{'dur s':>8}{'loss':>9}{'val':>9}  reason")
    for r in s.recent_rounds[-10:]:
        print(f"{r.round:>6}{len(r.members):>9}{r.bytes_in:>12,}{r.duration_s:>8.2f}{_f(r.mean_loss):>9}"
              f"{_f(r.val_loss):>9}  {r.reason}")
    return 0
