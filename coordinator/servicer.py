"""gRPC adapter: proto messages ⇄ CoordinatorCore calls; domain errors → status codes + precise text.

Every call has already passed the guard (coordinator/guard.py: bounds, signature, deadline). Any exception that is
not a domain error is a bug: the call ends INTERNAL with a short message, the traceback goes to the log
(rate-limited per exception type), and the server keeps serving.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any, Callable, Iterator

import grpc

from coordinator.bounds import RateLimited, check_node_id, printable
from coordinator.core import Chunk, CoordinatorCore
from coordinator.errors import CoordinatorError, Unauthorized
from coordinator.guard import tls_node_key
from coordinator.rounds import Waiter
from node.identity import key_id
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.transport.grpc_auth import MD_KEY

log = logging.getLogger(__name__)
PIECE = 256 << 10  # a Collect piece: every member's stream holds about two in flight at once, so their size bounds
# what a round's fan-out costs in memory (256 members × 2 × 256 KiB); larger pieces move no faster over a socket
_internal = RateLimited(log, every_s=60.0)


def _abort(context: grpc.ServicerContext, exc: CoordinatorError) -> None:
    if exc.metadata:
        context.set_trailing_metadata(tuple(exc.metadata.items()))
    context.abort(getattr(grpc.StatusCode, exc.code), str(exc))


def _fail(name: str, context: grpc.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, CoordinatorError):
        log.info("%s → %s: %s", name, exc.code, printable(exc, 300))
        _abort(context, exc)
    _internal.error(f"{name}:{type(exc).__name__}", "%s failed with an unexpected %s: %s (the call ends INTERNAL)",
                    name, type(exc).__name__, printable(exc, 200), exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name} ({type(exc).__name__}); the coordinator "
                                            "logged it")


def refusal_reason(exc: CoordinatorError) -> str:
    """A domain error's kind as a metric label: its class name in snake case (``WrongRound`` → ``wrong_round``)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def _refused(servicer: "CoordinatorServicer", name: str, exc: BaseException) -> None:
    if servicer.on_refusal is not None and isinstance(exc, CoordinatorError):
        servicer.on_refusal(name, refusal_reason(exc))


def translated(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map domain errors to statuses; anything else is a bug: INTERNAL, logged, and the server keeps serving."""
    @functools.wraps(fn)
    def wrapper(self: "CoordinatorServicer", request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 — the one place where every failure becomes a status
            _refused(self, fn.__name__, exc)
            _fail(fn.__name__, context, exc)
    return wrapper


def translated_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(fn)
    def wrapper(self: "CoordinatorServicer", request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _refused(self, fn.__name__, exc)
            _fail(fn.__name__, context, exc)
    return wrapper


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """``mtls``: client certificates are required, and a Join's key must be the one its certificate names.
    ``on_refusal(method, reason)``: told of every call refused with a domain error (the metrics count them)."""

    def __init__(self, core: CoordinatorCore, mtls: bool = False,
                 on_refusal: Callable[[str, str], None] | None = None) -> None:
        self.core, self.mtls, self.on_refusal = core, mtls, on_refusal

    @translated
    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.GetRunResponse:
        return pb.GetRunResponse(**self.core.run_info(request.protocol_version, request.read_token))

    @translated
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        if self.mtls:
            named = tls_node_key(context)
            if named != request.public_key:
                raise Unauthorized(f"with mutual TLS a node joins with the key its certificate names: the certificate "
                                   f"names {key_id(named) if named else 'no node key'}, the Join "
                                   f"{key_id(request.public_key) if len(request.public_key) == 32 else 'none'} "
                                   "(issue the certificate with `lowband certs --node WORKDIR`)")
        out = self.core.join(request.node_name, request.protocol_version, request.config_json, request.config_hash,
                             request.task_fingerprint, request.model_digest, request.capabilities, request.join_token,
                             request.public_key, request.signature, request.timestamp_ms)
        return pb.JoinResponse(**out)

    @translated
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(**self.core.heartbeat(request.node_id))

    @translated
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        self.core.leave(request.node_id, request.reason[:256])
        return pb.LeaveResponse()

    @translated
    def Submit(self, request_iterator: Iterator[pb.SubmitChunk], context: grpc.ServicerContext) -> pb.SubmitResponse:
        chunks = (Chunk(c.node_id, c.round, c.offset, c.total_size, c.data, c.train_loss) for c in request_iterator)
        return pb.SubmitResponse(**self.core.submit(chunks))

    @translated_stream
    def Collect(self, request: pb.CollectRequest, context: grpc.ServicerContext) -> Iterator[pb.CollectChunk]:
        wait_s = min(request.wait_ms, 60_000) / 1000.0
        waiter = Waiter()
        if not context.add_callback(waiter.cancel):  # a cancelled call frees its thread at once
            return
        result, to_send = self.core.collect(request.node_id, request.round, wait_s, request.submitted, waiter)
        members = list(result.frames)
        if result.aggregate is not None:
            yield pb.CollectChunk(header=pb.CollectHeader(
                round=result.round, committed=True, members=members, reference_fingerprint=result.fingerprint,
                reason=result.reason, aggregate_size=len(result.aggregate),
                aggregate_codec=self.core.cfg.result_codec))
            for off in range(0, len(result.aggregate), PIECE):
                yield pb.CollectChunk(piece=pb.PayloadPiece(member=0, offset=off,
                                                            data=result.aggregate[off:off + PIECE]))
            return
        yield pb.CollectChunk(header=pb.CollectHeader(
            round=result.round, committed=True, members=members,
            payload_sizes=[len(result.frames[m]) for m in members],
            reference_fingerprint=result.fingerprint, reason=result.reason,
            # the keys the frames are signed with (docs/algorithms.md §11); all or none, so every node checks alike
            member_keys=[result.keys[m] for m in members] if all(m in result.keys for m in members) else []))
        for name in to_send:
            frame, index = result.frames[name], members.index(name)
            for off in range(0, len(frame), PIECE):
                yield pb.CollectChunk(piece=pb.PayloadPiece(member=index, offset=off, data=frame[off:off + PIECE]))

    @translated_stream
    def FetchState(self, request: pb.FetchStateRequest, context: grpc.ServicerContext) -> Iterator[pb.StateChunk]:
        if request.node_id:
            check_node_id(request.node_id)
        key = dict(context.invocation_metadata() or ()).get(MD_KEY)  # verified by the guard before Join
        waiter = Waiter()
        if not context.add_callback(waiter.cancel):  # a call cancelled while it waits for a snapshot frees its thread
            return
        for part in self.core.fetch_state(request.node_id, request.offset, request.join_token,
                                          key if isinstance(key, bytes) else None, request.min_committed_rounds,
                                          waiter):
            yield pb.StateChunk(**part)

    @translated
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        self.core.check_read(request.read_token)
        return status_response(self.core)


def _accountability(record: Any) -> dict[str, Any]:
    """MemberStatus's accountability fields from a member's robust record (None: the recipe's reduce is off, or the
    member sent no frame yet)."""
    if record is None:
        return {"norm_ratio": float("nan"), "cosine": float("nan")}
    return {"frames_seen": record.frames, "frames_clipped": record.clipped, "frames_rejected": record.rejected,
            "norm_ratio": record.norm_ratio if record.norm_ratio is not None else float("nan"),
            "cosine": record.cosine if record.cosine is not None else float("nan")}


def status_response(core: CoordinatorCore) -> pb.StatusResponse:
    """The run's ``Status`` view (also the dashboard's). No credential material: no session ids, no tokens; a member
    is its name and its key's public id."""
    s = core.status()
    now = s["now"]
    records = s["records"]  # accountability by name, with [recipe.reduce] on (node/robust/state.py)
    members = [pb.MemberStatus(name=m.name, key_id=key_id(m.public_key), last_heartbeat_age_s=now - m.last_heartbeat,
                               rounds_contributed=m.rounds_contributed, first_round=m.first_round,
                               bytes_in=m.bytes_in, bytes_out=m.bytes_out,
                               last_loss=m.last_loss if not math.isnan(m.last_loss) else float("nan"),
                               capabilities=list(m.capabilities), **_accountability(records.get(m.name)))
               for m in s["members"]]
    evicted = [pb.EvictedMember(name=n, round=r.evicted_at, reason=r.reason)
               for n, r in sorted(records.items()) if r.evicted]
    rounds = [pb.RoundStatus(round=r.round, members=r.members, bytes_in=r.bytes_in, bytes_out=r.bytes_out,
                             duration_s=r.duration_s, mean_loss=r.mean_loss, reason=r.reason,
                             val_loss=r.val_loss, reference_fingerprint=r.fingerprint) for r in s["recent"]]
    return pb.StatusResponse(run_id=s["run_id"], recipe=s["recipe"], current_round=s["current_round"],
                             committed_rounds=s["committed_rounds"], deadline_in_s=s["deadline_in_s"],
                             members=members, recent_rounds=rounds,
                             reference_fingerprint=s["reference_fingerprint"], submitted=s["submitted"],
                             persistence_error=s["persistence_error"], evicted=evicted,
                             total_rounds=s["total_rounds"])
