"""The node's side of the gRPC coordinator: retries with backoff, resumable uploads and downloads,
heartbeats in the background. A network fault never raises out of ``exchange``: it waits, retries,
and reports the round as not committed only when the caller's deadline passes.

Every call after Join is signed by the node's key (node/transport/grpc_auth.py); the channel is TLS when a
``ClientTls`` is given. A coordinator that answers INTERNAL or UNKNOWN (a bug on its side, not the network) is
retried only ``MAX_FAULTS`` times in a row: then ``CoordinatorFault`` is raised and the node exits naming it.
Waits (backoff, the stall watch, a collect's bound) are decided on an injected ``node.clock.Clock``.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import grpc

from node.clock import SYSTEM_CLOCK, Clock
from node.logutil import RateLimited
from node.identity import NodeKey
from node.progress import Progress
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
# re-exported: callers import them from here too
from node.transport.control import Identity, JoinRefused, Rejoin, Stopped  # noqa: F401
from node.transport.grpc_auth import UPLOAD_GO, ClientTls, SigningInterceptor, join_message, open_channel
from node.transport.grpc_watch import StallWatch, tls_hint  # noqa: F401 — tls_hint: importers use it from here
from node.transport.grpc_result import assemble
from node.transport.limits import UNKNOWN_MODEL
from node.transport.messages import RoundResult, RoundStatus, StateBlob

log = logging.getLogger(__name__)
retries = RateLimited(log)  # one line per kind of failed call per 10 s while the coordinator is away
PROTOCOL_VERSION = 3  # coordinator/core.py's; what changed with each: proto/lowband/v1/coordinator.proto
CHUNK = 1 << 20
UPLOAD_SLOT_WAIT_S = 30.0  # the longest a coordinator lets an upload wait for a slot (coordinator/upload_gate.py)
RESULT_DOWNLOAD_MAX_S = 3600.0  # a round's result that takes longer than this to download is given up on
MIN_UPLOAD_BPS = 2e6  # the slowest uplink an upload's deadline allows for (the `bad` link profile's rate)
PROGRESS_FROM = 4 << 20  # a state download this large or larger shows its progress
MAX_FAULTS = 6  # INTERNAL/UNKNOWN answers in a row before the node gives up on the coordinator
FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED}
REFUSALS = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}


class NeedResubmit(Exception):
    """The coordinator holds no payload from us for the open round (it restarted): upload it again."""


class CoordinatorFault(Exception):
    """The coordinator kept failing with INTERNAL/UNKNOWN: a bug or a broken deployment on its side, which retrying
    does not fix. The node stops (``lowband node`` exits 4 naming it)."""


@dataclass
class Backoff:
    initial: float = 0.2
    maximum: float = 5.0
    clock: Clock = SYSTEM_CLOCK
    _next: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self._next = 0.0

    def sleep(self, stop: threading.Event) -> None:
        self._next = min(self.maximum, max(self.initial, self._next * 2))
        if self.clock.sleep(self._next * random.uniform(0.8, 1.2), stop):
            raise Stopped()


def _metadata(exc: grpc.RpcError, key: str) -> str | None:
    for k, v in (exc.trailing_metadata() or ()):
        if k == key:
            return v
    return None


def _busy(exc: grpc.RpcError) -> bool:
    """A RESOURCE_EXHAUSTED that is a passing bound of the coordinator (too many calls at once: metadata
    ``lowband-retry``, or gRPC's own concurrency limit), to retry — not a refusal such as "the run is full"."""
    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        _metadata(exc, "lowband-retry") is not None or "Concurrent RPC limit" in (exc.details() or ""))


class StateRefused(RuntimeError):
    """The coordinator announced a state larger than any state of this node's model (``ResultLimits.state``)."""


class GrpcTransport:
    """The coordinator's RPCs with retries; ``GrpcControl`` adapts it to the ``ControlPlane`` seam.

    ``key``: the node's identity (a fresh in-memory key when None: tests and benchmarks); ``tls``: TLS settings
    (None: plaintext); ``token``: the run's join or read token for GetRun and Status; ``interceptors``: extra client
    interceptors, outermost first, that see every call as the transport makes it (tests inject faults there);
    ``clock``: what retries and stall watches wait on."""

    def __init__(self, address: str, stop: threading.Event | None = None, rpc_timeout_s: float = 30.0, *,
                 key: NodeKey | None = None, tls: ClientTls | None = None, token: str = "",
                 interceptors: Sequence[grpc.ClientInterceptor] = (), clock: Clock = SYSTEM_CLOCK) -> None:
        self.address = address
        self.stop = stop or threading.Event()
        self.rpc_timeout_s = rpc_timeout_s
        self.key = key or NodeKey.generate()
        self.token = token
        self.tls = tls
        self.clock = clock
        # gRPC's own reconnect backoff grows to 120 s by default: after a long coordinator outage a node would
        # sit idle that long after the coordinator is back. Cap it at our retry backoff's maximum.
        self._raw, self.channel = open_channel(
            address, tls, [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20),
                           ("grpc.max_reconnect_backoff_ms", int(Backoff.maximum * 1000))],
            [*interceptors, SigningInterceptor(self.key)])
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.identity: Identity | None = None
        self.node_id = ""
        self.heartbeat_s = 2.0
        self.current_round = 0
        self.lost = threading.Event()  # the coordinator forgot us (seen by the heartbeat thread)
        self._hb: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self.join_response: pb.JoinResponse | None = None
        self._own: tuple[int, bytes] | None = None  # the last frame the coordinator accepted: not sent back to us
        self.limits = UNKNOWN_MODEL  # what a result or state may take at most: the node sets its model's (engine)
        self._faults = 0  # INTERNAL/UNKNOWN answers in a row

    def _backoff(self) -> Backoff:
        return Backoff(clock=self.clock)

    # -- retrying ------------------------------------------------------------------------------------
    def _ok(self) -> None:
        self._faults = 0

    def _fault(self, what: str, exc: grpc.RpcError) -> None:
        """Count an INTERNAL/UNKNOWN answer; raise CoordinatorFault once there were ``MAX_FAULTS`` in a row."""
        if exc.code() not in FAULTS:
            return
        self._faults += 1
        if self._faults >= MAX_FAULTS:
            raise CoordinatorFault(f"the coordinator at {self.address} answered {what} with {exc.code().name} "
                                   f"{self._faults} times in a row (last: {exc.details()}): a fault on its side, "
                                   "which retrying does not fix; see the coordinator's log") from None

    def _retry(self, what: str, call: Callable[[], Any]) -> Any:
        backoff = self._backoff()
        while True:
            if self.stop.is_set():
                raise Stopped()
            try:
                out = call()
                self._ok()
                return out
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE and not _busy(exc):
                    raise
                self._fault(what, exc)
                retries.warning(f"{what}:{exc.code().name}", "%s: coordinator unreachable (%s: %s); retrying%s", what,
                                exc.code().name, exc.details(), tls_hint(exc, self.tls))
                backoff.sleep(self.stop)

    # -- run and membership --------------------------------------------------------------------------
    def get_run(self) -> pb.GetRunResponse:
        req = pb.GetRunRequest(protocol_version=PROTOCOL_VERSION, read_token=self.token)
        return self._retry("GetRun", lambda: self.stub.GetRun(req, timeout=self.rpc_timeout_s))

    def status(self) -> pb.StatusResponse:
        req = pb.StatusRequest(read_token=self.token)
        return self._retry("Status", lambda: self.stub.Status(req, timeout=self.rpc_timeout_s))

    def _join_request(self, run_id: str) -> pb.JoinRequest:
        ident = self.identity
        assert ident is not None, "set .identity before join()"
        ts = int(time.time() * 1000)  # wall time: the coordinator checks it against its own clock
        return pb.JoinRequest(node_name=ident.name, protocol_version=PROTOCOL_VERSION, config_json=ident.config_json,
                              config_hash=ident.config_hash, task_fingerprint=ident.task_fingerprint,
                              model_digest=ident.model_digest, capabilities=list(ident.capabilities),
                              join_token=ident.join_token, public_key=self.key.public, timestamp_ms=ts,
                              signature=self.key.sign(join_message(run_id, ident.name, self.key.public, ts)))

    def join(self) -> pb.JoinResponse:
        """Join with this transport's key; raises JoinRefused with the coordinator's reason."""
        assert self.identity is not None, "set .identity before join()"
        if not self.token:
            self.token = self.identity.join_token
        try:
            run_id = self.get_run().run_id
            # signed afresh at every attempt: a retry after an outage must not carry a stale timestamp
            resp = self._retry("Join", lambda: self.stub.Join(self._join_request(run_id), timeout=self.rpc_timeout_s))
        except grpc.RpcError as exc:
            if exc.code() in REFUSALS:
                raise JoinRefused(f"{exc.code().name}: {exc.details()}") from None
            raise
        self.join_response = resp
        self.node_id = resp.node_id
        self.heartbeat_s = resp.heartbeat_interval_ms / 1000.0
        self.current_round = resp.current_round
        self.lost.clear()
        if resp.replaced:
            log.info("took this node's place back in the run (its previous session ended)")
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
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                    if node_id == self.node_id:  # not a session this node already replaced by joining again
                        log.warning("coordinator no longer accepts this session: %s", exc.details())
                        self.lost.set()
                    return
                log.debug("heartbeat failed: %s", exc.code().name)

    def leave(self, reason: str = "shutdown") -> None:
        self._hb_stop.set()
        if self.node_id:
            try:
                self.stub.Leave(pb.LeaveRequest(node_id=self.node_id, reason=reason), timeout=5)
                log.info("left the run at %s (%s)", self.address, reason)
            except grpc.RpcError as exc:
                log.info("leave: %s", exc.code().name)

    def close(self) -> None:
        self._hb_stop.set()
        self._raw.close()

    # -- rounds --------------------------------------------------------------------------------------
    def _chunks(self, round_: int, payload: bytes, offset: int, loss: float, sent: list[int],
                go: Callable[[], bool] | None = None) -> Iterator[pb.SubmitChunk]:
        if go is not None:
            # the head names the upload (the signature covers its round and size) and carries no bytes; the frame's
            # chunks follow the coordinator's go — the call ended without one: its error is the call's
            yield pb.SubmitChunk(node_id=self.node_id, round=round_, offset=offset, total_size=len(payload),
                                 train_loss=loss)
            if not go():
                return
        for start in range(offset, len(payload), CHUNK):
            sent[0] = start  # gRPC pulls a chunk when it can send it: the bytes before it have left
            yield pb.SubmitChunk(node_id=self.node_id, round=round_, offset=start, total_size=len(payload),
                                 data=payload[start:start + CHUNK], train_loss=loss)

    def _upload_timeout(self, remaining: int) -> float:
        """An upload's deadline grows with what is left to send, at the slowest rate a link is expected to keep
        up (``MIN_UPLOAD_BPS``): a fixed deadline would cut every large payload on a slow uplink at the same byte."""
        return self.rpc_timeout_s + UPLOAD_SLOT_WAIT_S + remaining * 8 / MIN_UPLOAD_BPS

    def _upload(self, round_: int, payload: bytes, offset: int, loss: float, sent: list[int]) -> None:
        """One Submit call from ``offset``. With a coordinator that says when an upload may send (JoinResponse
        .upload_go) the chunks wait for its "go": an upload waiting for one of its upload slots sends nothing, so the
        coordinator holds no bytes of it meanwhile (coordinator/upload_gate.py). Raises grpc.RpcError."""
        timeout = self._upload_timeout(len(payload) - offset)
        if self.join_response is None or not self.join_response.upload_go:
            self.stub.Submit(self._chunks(round_, payload, offset, loss, sent), timeout=timeout)
            return
        calls: list[Any] = []
        made = threading.Event()

        def go() -> bool:  # on gRPC's request thread, before the first chunk
            made.wait()
            metadata = calls[0].initial_metadata()  # blocks until the coordinator's headers, or the call's end
            return UPLOAD_GO in tuple(metadata or ())

        call = self.stub.Submit.future(self._chunks(round_, payload, offset, loss, sent, go), timeout=timeout)
        calls.append(call)
        made.set()
        call.result()

    def submit(self, round_: int, payload: bytes, loss: float = float("nan")) -> str:
        """Upload with resume. Returns "accepted", "late" (round closed) or "rejected: <why>"."""
        offset, backoff = 0, self._backoff()
        self._own = None
        while True:
            if self.stop.is_set():
                raise Stopped()
            sent = [offset]
            try:
                self._upload(round_, payload, offset, loss, sent)
                self._ok()
                self._own = (round_, payload)  # only a frame the coordinator took stands in for ours in its result
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
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                    raise Rejoin(exc.details()) from None
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    return "late"
                if _busy(exc):
                    log.info("submit round %d: %s; retrying", round_, exc.details())
                    backoff.sleep(self.stop)
                    continue
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.ALREADY_EXISTS):
                    return f"rejected: {exc.details()}"
                self._fault("Submit", exc)
                retries.warning(f"submit:{code.name}", "submit round %d: %s (%s); retrying", round_, code.name,
                                exc.details())
                backoff.sleep(self.stop)

    def collect(self, round_: int, timeout_s: float, submitted: bool = True, own: bytes | None = None,
                own_name: str = "") -> RoundResult:
        end = self.clock.now() + timeout_s
        backoff = self._backoff()
        if not submitted:  # the coordinator sends our frame too: the one it committed may not be the one we hold
            own = None
        elif own is None and self._own is not None and self._own[0] == round_ and self.identity is not None:
            own, own_name = self._own[1], self.identity.name
        while self.clock.now() < end:
            if self.stop.is_set():
                raise Stopped()
            wait_ms = int(max(0.1, min(20.0, end - self.clock.now())) * 1000)
            asked = self.clock.now()
            try:
                # the deadline only bounds a download that keeps moving; the watch cuts one that stalls
                stream = self.stub.Collect(pb.CollectRequest(node_id=self.node_id, round=round_, wait_ms=wait_ms,
                                                             submitted=submitted),
                                           timeout=wait_ms / 1000 + self.rpc_timeout_s + RESULT_DOWNLOAD_MAX_S)
                with StallWatch(stream, wait_ms / 1000 + self.rpc_timeout_s, self.rpc_timeout_s,
                                self.clock) as watch:
                    result = assemble(stream, round_, own, own_name, self.limits, watch.progressed)
                self._ok()
                return result
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                    raise Rejoin(exc.details()) from None
                if code == grpc.StatusCode.ABORTED:  # no payload of ours is held (metadata lowband-not-submitted)
                    raise NeedResubmit(exc.details()) from None
                if code == grpc.StatusCode.FAILED_PRECONDITION:  # the result is not held (or not yet open)
                    return RoundResult(round_, RoundStatus.RESULT_GONE, reason=exc.details())
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # the round is still open: ask again
                    if self.clock.now() - asked < wait_ms / 2000:
                        backoff.sleep(self.stop)  # said without waiting: never a loop of calls at once
                    else:
                        backoff.reset()
                    continue
                if code in RETRYABLE or _busy(exc):
                    self._fault("Collect", exc)
                    retries.warning(f"collect:{code.name}", "collect round %d: %s (%s); retrying", round_, code.name,
                                    exc.details())
                    backoff.sleep(self.stop)
                    continue
                raise
        return RoundResult(round_, RoundStatus.TIMED_OUT, reason=f"round {round_} did not close within {timeout_s:.0f} s")

    def exchange(self, round_: int, payload: bytes, timeout_s: float, loss: float = float("nan"),
                 own_name: str = "") -> RoundResult:
        """Submit then collect; resubmits when the coordinator lost our payload (e.g. it restarted)."""
        end = self.clock.now() + timeout_s
        outcome = self.submit(round_, payload, loss)
        if outcome.startswith("rejected"):
            log.error("round %d: payload %s", round_, outcome)
        backoff, resubmitted = self._backoff(), False
        while True:
            try:
                result = self.collect(round_, max(0.0, end - self.clock.now()), submitted=outcome == "accepted",
                                      own=payload, own_name=own_name)
                return dataclasses.replace(result, bytes_sent=len(payload))
            except NeedResubmit as exc:
                log.warning("round %d: %s", round_, exc)
                if resubmitted:  # once at once (the coordinator restarted); again only after the backoff
                    backoff.sleep(self.stop)
                resubmitted = True
                outcome = self.submit(round_, payload, loss)

    def fetch_state(self, timeout_s: float = 600.0, join_token: str = "", min_committed: int = 0,
                    at_least: int = 0) -> StateBlob | None:
        """(committed rounds, state blob, fingerprint); resumes from the last byte after a broken stream.
        Before Join (no node id yet) the join token authorises the download, signed by this transport's key. None
        when the run's state is from before round ``min_committed`` (e.g. 1: the seeded initial state every node
        builds for itself). ``at_least``: the coordinator sends no state older than this while it has committed as
        many rounds (FetchStateRequest.min_committed_rounds)."""
        buf, backoff = bytearray(), self._backoff()
        committed, total, fingerprint = -1, -1, ""
        progress: Progress | None = None  # shown for a state of PROGRESS_FROM bytes or more
        barren = 0  # attempts in a row that ended without the state and brought none of it
        while True:
            if self.stop.is_set():
                raise Stopped()
            got = 0  # bytes this attempt added
            try:
                request = pb.FetchStateRequest(node_id=self.node_id, offset=len(buf), join_token=join_token,
                                               min_committed_rounds=max(min_committed, at_least))
                stream = self.stub.FetchState(request, timeout=timeout_s)
                for chunk in stream:
                    if committed not in (-1, chunk.committed_rounds):
                        buf, committed = bytearray(), -1  # the state moved on: start over
                        break
                    committed, total, fingerprint = chunk.committed_rounds, chunk.total_size, chunk.reference_fingerprint
                    if committed < min_committed:
                        stream.cancel()
                        return None
                    if total > self.limits.state:
                        stream.cancel()
                        raise StateRefused(f"the coordinator's state is {total} bytes, more than the "
                                           f"{self.limits.state} any state of this model takes")
                    if chunk.offset != len(buf) or len(buf) + len(chunk.data) > total:
                        break
                    buf += chunk.data
                    got += len(chunk.data)
                    if progress is None and total >= PROGRESS_FROM:
                        progress = Progress(f"state download from {self.address}", total)
                    if progress is not None:
                        progress.update(len(buf))
                self._ok()
                if total >= 0 and len(buf) == total:
                    if progress is not None:
                        progress.close()
                    return StateBlob(committed, bytes(buf), fingerprint)
                stream.cancel()  # ended, or left, without the whole state: a new attempt below
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND or (exc.code() == grpc.StatusCode.UNAUTHENTICATED
                                                               and self.node_id):
                    raise Rejoin(exc.details()) from None
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE:  # past the end of a newer, shorter state: start over
                    buf, committed = bytearray(), -1
                    barren = self._barren_state_attempt(barren, got, backoff, "OUT_OF_RANGE")
                    continue
                if exc.code() not in RETRYABLE and not _busy(exc):
                    raise
                self._fault("FetchState", exc)
                if got:
                    barren = 0
                log.warning("fetch state from %s: %s (%s); %s", self.address, exc.code().name,
                            (exc.details() or "")[:160], f"resuming at byte {len(buf)}" if buf else "retrying")
                backoff.sleep(self.stop)
                continue
            # the stream ended without error but without the whole state: an honest coordinator does that only when
            # its state moved on since the last attempt (we start over); never at once and never without end
            barren = self._barren_state_attempt(barren, got, backoff, "a stream without the whole state")

    def _barren_state_attempt(self, barren: int, got: int, backoff: Backoff, what: str) -> int:
        """Account for a FetchState attempt that ended without the state, having brought ``got`` bytes of it: wait
        the retry backoff (reset after bytes came: an honest restart stays quick). Returns the attempts in a row that
        brought nothing; raises CoordinatorFault once there were ``MAX_FAULTS`` (a coordinator that never sends the
        state would otherwise be called again forever)."""
        if got:
            barren = 0
            backoff.reset()
        else:
            barren += 1
            if barren >= MAX_FAULTS:
                raise CoordinatorFault(f"the coordinator at {self.address} answered FetchState {barren} times in a "
                                       f"row with {what} and none of its bytes: a fault on its side, which "
                                       "retrying does not fix; see the coordinator's log")
        backoff.sleep(self.stop)
        return barren
