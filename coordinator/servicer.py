"""gRPC adapter: proto messages ⇄ CoordinatorCore calls; domain errors → status codes + precise text."""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Iterator

import grpc

from coordinator.core import Chunk, CoordinatorCore
from coordinator.errors import CoordinatorError
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
PIECE = 1 << 20


def _abort(context: grpc.ServicerContext, exc: CoordinatorError) -> None:
    if exc.metadata:
        context.set_trailing_metadata(tuple(exc.metadata.items()))
    context.abort(getattr(grpc.StatusCode, exc.code), str(exc))


def translated(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map domain errors to statuses; anything else is a bug: INTERNAL, logged, and the server keeps serving."""
    @functools.wraps(fn)
    def wrapper(self: "CoordinatorServicer", request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except CoordinatorError as exc:
            log.info("%s → %s: %s", fn.__name__, exc.code, exc)
            _abort(context, exc)
        except ValueError as exc:
            _abort(context, _Invalid(str(exc)))
    return wrapper


def translated_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(fn)
    def wrapper(self: "CoordinatorServicer", request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except CoordinatorError as exc:
            log.info("%s → %s: %s", fn.__name__, exc.code, exc)
            _abort(context, exc)
    return wrapper


class _Invalid(CoordinatorError):
    code = "INVALID_ARGUMENT"


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, core: CoordinatorCore) -> None:
        self.core = core

    @translated
    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.GetRunResponse:
        return pb.GetRunResponse(**self.core.run_info(request.protocol_version))

    @translated
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        out = self.core.join(request.node_name, request.protocol_version, request.config_json, request.config_hash,
                             request.task_fingerprint, request.model_digest, request.capabilities, request.join_token)
        return pb.JoinResponse(**out)

    @translated
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(**self.core.heartbeat(request.node_id))

    @translated
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        self.core.leave(request.node_id, request.reason)
        return pb.LeaveResponse()

    @translated
    def Submit(self, request_iterator: Iterator[pb.SubmitChunk], context: grpc.ServicerContext) -> pb.SubmitResponse:
        chunks = (Chunk(c.node_id, c.round, c.offset, c.total_size, c.data, c.train_loss) for c in request_iterator)
        return pb.SubmitResponse(**self.core.submit(chunks))

    @translated_stream
    def Collect(self, request: pb.CollectRequest, context: grpc.ServicerContext) -> Iterator[pb.CollectChunk]:
        wait_s = min(request.wait_ms, 60_000) / 1000.0
        result, to_send = self.core.collect(request.node_id, request.round, wait_s, request.submitted)
        members = list(result.frames)
        if result.aggregate is not None:
            yield pb.CollectChunk(header=pb.CollectHeader(
                round=result.round, committed=True, members=members, reference_fingerprint=result.fingerprint,
                reason=result.reason, aggregate_size=len(result.aggregate),
                aggregate_codec=self.core.cfg.aggregate_codec))
            for off in range(0, len(result.aggregate), PIECE):
                yield pb.CollectChunk(piece=pb.PayloadPiece(member=0, offset=off,
                                                            data=result.aggregate[off:off + PIECE]))
            return
        yield pb.CollectChunk(header=pb.CollectHeader(
            round=result.round, committed=True, members=members,
            payload_sizes=[len(result.frames[m]) for m in members],
            reference_fingerprint=result.fingerprint, reason=result.reason))
        for name in to_send:
            frame, index = result.frames[name], members.index(name)
            for off in range(0, len(frame), PIECE):
                yield pb.CollectChunk(piece=pb.PayloadPiece(member=index, offset=off, data=frame[off:off + PIECE]))

    @translated_stream
    def FetchState(self, request: pb.FetchStateRequest, context: grpc.ServicerContext) -> Iterator[pb.StateChunk]:
        for part in self.core.fetch_state(request.node_id, request.offset, request.join_token):
            yield pb.StateChunk(**part)

    @translated
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        s = self.core.status()
        now = s["now"]
        members = [pb.MemberStatus(node_id=m.node_id[:8], name=m.name, last_heartbeat_age_s=now - m.last_heartbeat,
                                   rounds_contributed=m.rounds_contributed, first_round=m.first_round,
                                   bytes_in=m.bytes_in, bytes_out=m.bytes_out,
                                   last_loss=m.last_loss if not math.isnan(m.last_loss) else float("nan"),
                                   capabilities=list(m.capabilities)) for m in s["members"]]
        rounds = [pb.RoundStatus(round=r.round, members=r.members, bytes_in=r.bytes_in, bytes_out=r.bytes_out,
                                 duration_s=r.duration_s, mean_loss=r.mean_loss, reason=r.reason,
                                 val_loss=r.val_loss, reference_fingerprint=r.fingerprint) for r in s["recent"]]
        return pb.StatusResponse(run_id=s["run_id"], recipe=s["recipe"], current_round=s["current_round"],
                                 committed_rounds=s["committed_rounds"], deadline_in_s=s["deadline_in_s"],
                                 members=members, recent_rounds=rounds,
                                 reference_fingerprint=s["reference_fingerprint"], submitted=s["submitted"])
