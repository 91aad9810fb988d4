"""The node's side of the gRPC coordinator: retries with backoff, resumable uploads and downloads,
heartbeats in the background. A network fault never raises out of ``exchange``: it waits, retries,
and reports the round as not committed only when the caller's deadline passes.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpc

from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
# re-exported: callers import them from here too
from node.transport.control import Identity, JoinRefused, Rejoin, Stopped  # noqa: F401
from node.transport.messages import RoundResult, RoundStatus, StateBlob

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1
CHUNK = 1 << 20
RESULT_DOWNLOAD_MAX_S = 3600.0  # a round's result that takes longer than this to download is given up on
MIN_UPLOAD_BPS = 2e6  # the slowest uplink an upload's deadline allows for (the `bad` link profile's rate)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED}
REFUSALS = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}


class NeedResubmit(Exception):
    """The coordinator holds no payload from us for the open round (it restarted): upload it again."""


@dataclass
class Backoff:
    initial: float = 0.2
    maximum: float = 5.0
    _next: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self._next = 0.0

    def sleep(self, stop: threading.Event) -> None:
        self._next = min(self.maximum, max(self.initial, self._next * 2))
        if stop.wait(self._next * random.uniform(0.8, 1.2)):
            raise Stopped()


def _metadata(exc: grpc.RpcError, key: str) -> str | None:
    for k, v in (exc.trailing_metadata() or ()):
        if k == key:
            return v
    return None


def _status(header: pb.CollectHeader) -> RoundStatus:
    return RoundStatus.COMMITTED if header.committed else RoundStatus.NO_QUORUM


class StallWatch:
    """Cancels a streaming call once nothing arrived for ``idle_s`` (``first_s`` before the first message), however
    long it runs while messages keep coming: a result that takes minutes on a slow downlink must not be cut by a
    fixed deadline, and a stalled one must not hang. Use as a context manager around the iteration."""

    def __init__(self, call: Any, first_s: float, idle_s: float) -> None:
        self.call, self.idle_s = call, idle_s
        self.due = time.monotonic() + first_s
        self.stalled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)

    def progressed(self) -> None:
        self.due = time.monotonic() + self.idle_s

    def _watch(self) -> None:
        while not self._done.wait(max(0.05, min(1.0, self.due - time.monotonic()))):
            if time.monotonic() >= self.due:
                self.stalled = True
                self.call.cancel()
                return

    def __enter__(self) -> "StallWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)


class GrpcTransport:
    """The coordinator's RPCs with retries; ``GrpcControl`` adapts it to the ``ControlPlane`` seam."""

    def __init__(self, address: str, stop: threading.Event | None = None, rpc_timeout_s: float = 30.0) -> None:
        self.address = address
        self.stop = stop or threading.Event()
        self.rpc_timeout_s = rpc_timeout_s
        # gRPC's own reconnect backoff grows to 120 s by default: after a long coordinator outage a node would
        # sit idle that long after the coordinator is back. Cap it at our retry backoff's maximum.
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 8 << 20),
                                                              ("grpc.max_send_message_length", 8 << 20),
                                                              ("grpc.max_reconnect_backoff_ms",
                                                               int(Backoff.maximum * 1000))])
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.identity: Identity | None = None
        self.node_id = ""
        self.heartbeat_s = 2.0
        self.current_round = 0
        self.lost = threading.Event()  # the coordinator forgot us (seen by the heartbeat thread)
        self._hb: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self.join_response: pb.JoinResponse | None = None
        self._own: tuple[int, bytes] | None = None  # the last frame we submitted: Collect does not send it back

    # -- retrying ------------------------------------------------------------------------------------
    def _retry(self, what: str, call: Callable[[], object]) -> object:
        backoff = Backoff()
        while True:
            if self.stop.is_set():
                raise Stopped()
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                log.warning("%s: coordinator unreachable (%s: %s); retrying", what, exc.code().name, exc.details())
                backoff.sleep(self.stop)

    # -- run and membership --------------------------------------------------------------------------
    def get_run(self) -> pb.GetRunResponse:
        return self._retry("GetRun", lambda: self.stub.GetRun(pb.GetRunRequest(protocol_version=PROTOCOL_VERSION),
                                                              timeout=self.rpc_timeout_s))

    def status(self) -> pb.StatusResponse:
        return self._retry("Status", lambda: self.stub.Status(pb.StatusRequest(), timeout=self.rpc_timeout_s))

    def join(self) -> pb.JoinResponse:
        ident = self.identity
        assert ident is not None, "set .identity before join()"
        req = pb.JoinRequest(node_name=ident.name, protocol_version=PROTOCOL_VERSION, config_json=ident.config_json,
                             config_hash=ident.config_hash, task_fingerprint=ident.task_fingerprint,
                             model_digest=ident.model_digest, capabilities=list(ident.capabilities),
                             join_token=ident.join_token)
        try:
            resp = self._retry("Join", lambda: self.stub.Join(req, timeout=self.rpc_timeout_s))
        except grpc.RpcError as exc:
            if exc.code() in REFUSALS:
                raise JoinRefused(f"{exc.code().name}: {exc.details()}") from None
            raise
        self.join_response = resp
        self.node_id = resp.node_id
        self.heartbeat_s = resp.heartbeat_interval_ms / 1000.0
        self.current_round = resp.current_round
        self.lost.clear()
        self._start_heartbeats()
        return resp

    def _start_heartbeats(self) -> None:
        self._hb_stop.set()
        if self._hb is not None:
            self._hb.join()
        self._hb_stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat_loop, args=(self._hb_stop, self.node_id),
                                    name="heartbeat", daemon=True)
        self._hb.start()

    def _heartbeat_loop(self, stop: threading.Event, node_id: str) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                resp = self.stub.Heartbeat(pb.HeartbeatRequest(node_id=node_id), timeout=self.heartbeat_s * 2)
                self.current_round = resp.current_round
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning("coordinator no longer knows this node: %s", exc.details())
                    self.lost.set()
                    return
                log.debug("heartbeat failed: %s", exc.code().name)

    def leave(self, reason: str = "shutdown") -> None:
        self._hb_stop.set()
        if self.node_id:
            try:
                self.stub.Leave(pb.LeaveRequest(node_id=self.node_id, reason=reason), timeout=5)
            except grpc.RpcError as exc:
                log.info("leave: %s", exc.code().name)

    def close(self) -> None:
        self._hb_stop.set()
        self.channel.close()

    # -- rounds --------------------------------------------------------------------------------------
    def _chunks(self, round_: int, payload: bytes, offset: int, loss: float,
                sent: list[int]) -> Iterator[pb.SubmitChunk]:
        for start in range(offset, len(payload), CHUNK):
            sent[0] = start  # gRPC pulls a chunk when it can send it: the bytes before it have left
            yield pb.SubmitChunk(node_id=self.node_id, round=round_, offset=start, total_size=len(payload),
                                 data=payload[start:start + CHUNK], train_loss=loss)

    def _upload_timeout(self, remaining: int) -> float:
        """An upload's deadline grows with what is left to send, at the slowest rate a link is expected to keep
        up (``MIN_UPLOAD_BPS``): a fixed deadline would cut every large payload on a slow uplink at the same byte."""
        return self.rpc_timeout_s + remaining * 8 / MIN_UPLOAD_BPS

    def submit(self, round_: int, payload: bytes, loss: float = float("nan")) -> str:
        """Upload with resume. Returns "accepted", "late" (round closed) or "rejected: <why>"."""
        offset, backoff = 0, Backoff()
        self._own = (round_, payload)
        while True:
            if self.stop.is_set():
                raise Stopped()
            sent = [offset]
            try:
                self.stub.Submit(self._chunks(round_, payload, offset, loss, sent),
                                 timeout=self._upload_timeout(len(payload) - offset))
                return "accepted"
            except grpc.RpcError as exc:
                code = exc.code()
                resume = _metadata(exc, "lowband-resume-offset")
                if resume is not None:
                    offset = int(resume)
                    continue
                # cut without a word from the server (deadline, connection lost): go on from the last chunk that
                # started to leave; offset 0 would restart the upload, any other offset the coordinator corrects
                offset = sent[0]
                if code == grpc.StatusCode.NOT_FOUND:
                    raise Rejoin(exc.details()) from None
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    return "late"
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.ALREADY_EXISTS):
                    return f"rejected: {exc.details()}"
                log.warning("submit round %d: %s (%s); retrying", round_, code.name, exc.details())
                backoff.sleep(self.stop)

    def collect(self, round_: int, timeout_s: float, submitted: bool = True, own: bytes | None = None,
                own_name: str = "") -> RoundResult:
        end = time.monotonic() + timeout_s
        backoff = Backoff()
        if own is None and self._own is not None and self._own[0] == round_ and self.identity is not None:
            own, own_name = self._own[1], self.identity.name
        while time.monotonic() < end:
            if self.stop.is_set():
                raise Stopped()
            wait_ms = int(max(0.1, min(20.0, end - time.monotonic())) * 1000)
            try:
                # the deadline only bounds a download that keeps moving; the watch cuts one that stalls
                stream = self.stub.Collect(pb.CollectRequest(node_id=self.node_id, round=round_, wait_ms=wait_ms,
                                                             submitted=submitted),
                                           timeout=wait_ms / 1000 + self.rpc_timeout_s + RESULT_DOWNLOAD_MAX_S)
                with StallWatch(stream, wait_ms / 1000 + self.rpc_timeout_s, self.rpc_timeout_s) as watch:
                    return self._assemble(stream, round_, own, own_name, watch)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    raise Rejoin(exc.details()) from None
                if _metadata(exc, "lowband-not-submitted") is not None:
                    raise NeedResubmit(exc.details()) from None
                if code == grpc.StatusCode.OUT_OF_RANGE:
                    return RoundResult(round_, RoundStatus.RESULT_GONE, reason=exc.details())
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    backoff.reset()
                    continue  # the round is still open: ask again
                if code in RETRYABLE:
                    log.warning("collect round %d: %s (%s); retrying", round_, code.name, exc.details())
                    backoff.sleep(self.stop)
                    continue
                raise
        return RoundResult(round_, RoundStatus.TIMED_OUT, reason=f"round {round_} did not close within {timeout_s:.0f} s")

    def _assemble(self, stream: Iterator[pb.CollectChunk], round_: int, own: bytes | None, own_name: str,
                  watch: StallWatch) -> RoundResult:
        header: pb.CollectHeader | None = None
        parts: dict[int, bytearray] = {}
        for chunk in stream:
            watch.progressed()
            if chunk.HasField("header"):
                header = chunk.header
            else:
                piece = chunk.piece
                buf = parts.setdefault(piece.member, bytearray())
                if piece.offset != len(buf):
                    return RoundResult(round_, RoundStatus.MALFORMED,
                                       reason=f"result pieces of member {piece.member} out of order")
                buf += piece.data
        if header is None:
            return RoundResult(round_, RoundStatus.MALFORMED, reason="empty result stream")
        if header.aggregate_size:
            data = bytes(parts.get(0, b""))
            if len(data) != header.aggregate_size:
                return RoundResult(round_, RoundStatus.MALFORMED,
                                   reason=f"aggregate arrived incomplete ({len(data)}/{header.aggregate_size})")
            sent = len(own) if own is not None and own_name in header.members else 0
            return RoundResult(round_, _status(header), {}, header.reason, bytes_sent=sent, bytes_received=len(data),
                               reference_fingerprint=header.reference_fingerprint, aggregate=data,
                               aggregate_codec=header.aggregate_codec, aggregate_members=tuple(header.members))
        payloads: dict[str, bytes] = {}
        received = 0
        for i, (name, size) in enumerate(zip(header.members, header.payload_sizes)):
            if name == own_name and own is not None:
                payloads[name] = own
                continue
            data = bytes(parts.get(i, b""))
            if len(data) != size:
                return RoundResult(round_, RoundStatus.MALFORMED,
                                   reason=f"payload of {name} arrived incomplete ({len(data)}/{size})")
            payloads[name] = data
            received += size
        sent = len(own) if own is not None and own_name in header.members else 0
        return RoundResult(round_, _status(header), dict(sorted(payloads.items())), header.reason,
                           bytes_sent=sent, bytes_received=received, reference_fingerprint=header.reference_fingerprint)

    def exchange(self, round_: int, payload: bytes, timeout_s: float, loss: float = float("nan"),
                 own_name: str = "") -> RoundResult:
        """Submit then collect; resubmits when the coordinator lost our payload (e.g. it restarted)."""
        end = time.monotonic() + timeout_s
        outcome = self.submit(round_, payload, loss)
        if outcome.startswith("rejected"):
            log.error("round %d: payload %s", round_, outcome)
        while True:
            try:
                result = self.collect(round_, max(0.0, end - time.monotonic()), submitted=outcome == "accepted",
                                      own=payload, own_name=own_name)
                return dataclasses.replace(result, bytes_sent=len(payload))
            except NeedResubmit as exc:
                log.warning("round %d: %s", round_, exc)
                outcome = self.submit(round_, payload, loss)

    def fetch_state(self, timeout_s: float = 600.0, join_token: str = "", min_committed: int = 0) -> StateBlob | None:
        """(committed rounds, state blob, fingerprint); resumes from the last byte after a broken stream.
        Before Join (no node id yet) the join token authorises the download. None when the run's state is from
        before round ``min_committed`` (e.g. 1: the seeded initial state every node builds for itself)."""
        buf, backoff = bytearray(), Backoff()
        committed, total, fingerprint = -1, -1, ""
        while True:
            if self.stop.is_set():
                raise Stopped()
            try:
                request = pb.FetchStateRequest(node_id=self.node_id, offset=len(buf), join_token=join_token)
                stream = self.stub.FetchState(request, timeout=timeout_s)
                for chunk in stream:
                    if committed not in (-1, chunk.committed_rounds):
                        buf, committed = bytearray(), -1  # the state moved on: start over
                        break
                    committed, total, fingerprint = chunk.committed_rounds, chunk.total_size, chunk.reference_fingerprint
                    if committed < min_committed:
                        stream.cancel()
                        return None
                    if chunk.offset != len(buf):
                        break
                    buf += chunk.data
                if total >= 0 and len(buf) == total:
                    return StateBlob(committed, bytes(buf), fingerprint)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise Rejoin(exc.details()) from None
                if exc.code() not in RETRYABLE:
                    raise
                log.warning("fetch state: %s; resuming at byte %d", exc.code().name, len(buf))
                backoff.sleep(self.stop)
