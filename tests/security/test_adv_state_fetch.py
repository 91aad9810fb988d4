"""Adversarial review (adv-today) of a member's retry loops (node/transport/grpc_client.py ``fetch_state``, ``collect``)
against a hostile coordinator: a bare gRPC servicer that answers FetchState or Collect only, and counts the calls.

- ``test_a_coordinator_that_never_completes_the_state_is_given_up_on`` — the finding, fixed: a FetchState stream
  that ended without error but without the whole state (nothing sent, a ``total_size`` larger than what it sends, a
  state that "moves on" at every call, chunks out of order) or an OUT_OF_RANGE at every call made the member call
  again at once, with no backoff and no end: one hostile (or broken) coordinator kept a member spinning at full CPU
  and flooding it with calls forever. Now every attempt that ends without the state waits the retry backoff, and
  ``MAX_FAULTS`` attempts in a row that bring none of it raise CoordinatorFault (the node exits naming it).
- ``test_a_collect_answered_still_open_at_once_backs_off`` — the same in Collect, fixed: DEADLINE_EXCEEDED ("the
  round is still open") was asked again at once; a coordinator that answers so without waiting kept the member
  calling it in a loop until the round's timeout.
- ``test_a_coordinator_that_forgets_every_payload_is_not_sent_it_in_a_loop`` — the same in Submit/Collect, fixed:
  Collect's ABORTED ("resubmit") sent the whole payload again at once, until the round's timeout.
- ``test_a_state_that_moves_on_once_still_downloads`` — what held: an honest coordinator whose snapshot moved on
  between a broken stream and its resume still gives the member the newer state.
"""
from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Iterator

import grpc
import pytest

from node.clock import ManualClock
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.transport.grpc_client import MAX_FAULTS, CoordinatorFault, GrpcTransport

PIECE = 1 << 16
GIVE_UP = 40  # calls after which the servicer stops the member itself (the unfixed client never stops on its own)


class _Broken(pb_grpc.CoordinatorServicer):
    """Answers FetchState in one of several broken ways (``mode``); stops the member after ``GIVE_UP`` calls."""

    def __init__(self, mode: str, stop: threading.Event) -> None:
        self.mode, self.stop, self.calls = mode, stop, 0
        self.lock = threading.Lock()

    def FetchState(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802 (gRPC's name)
        with self.lock:
            self.calls += 1
            n = self.calls
        if n >= GIVE_UP:
            self.stop.set()
        if self.mode == "out_of_range":
            context.abort(grpc.StatusCode.OUT_OF_RANGE, "past the end")
        if self.mode == "empty":
            return
        if self.mode == "short":  # announces two pieces, sends only the first: the resume gets nothing
            if request.offset == 0:
                yield pb.StateChunk(committed_rounds=3, total_size=2 * PIECE, offset=0, data=b"\0" * PIECE,
                                    reference_fingerprint="0" * 16)
            return
        if self.mode == "moves_on":  # another state at every call, never a byte of it
            yield pb.StateChunk(committed_rounds=3 + n % 2, total_size=PIECE, offset=request.offset, data=b"",
                                reference_fingerprint="0" * 16)
            yield pb.StateChunk(committed_rounds=4 - n % 2, total_size=PIECE, offset=request.offset, data=b"",
                                reference_fingerprint="0" * 16)
            return
        if self.mode == "out_of_order":
            yield pb.StateChunk(committed_rounds=3, total_size=PIECE, offset=request.offset + 1, data=b"\0",
                                reference_fingerprint="0" * 16)


def _fetch(servicer: pb_grpc.CoordinatorServicer, stop: threading.Event) -> tuple[Any, ManualClock]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    clock = ManualClock()
    transport = GrpcTransport(f"127.0.0.1:{port}", stop=stop, rpc_timeout_s=5.0, clock=clock)
    try:
        return transport.fetch_state(timeout_s=20.0), clock
    finally:
        transport.close()
        server.stop(0)


@pytest.mark.parametrize("mode", ["empty", "short", "moves_on", "out_of_order", "out_of_range"])
def test_a_coordinator_that_never_completes_the_state_is_given_up_on(mode: str) -> None:
    stop = threading.Event()
    servicer = _Broken(mode, stop)
    with pytest.raises(CoordinatorFault, match="FetchState"):
        _fetch(servicer, stop)
    assert servicer.calls <= MAX_FAULTS + 1  # the "short" one's first call brings a piece
    assert not stop.is_set()


class _MovesOnce(pb_grpc.CoordinatorServicer):
    """An honest coordinator whose snapshot moved on: the first stream breaks after one piece of a state of 3 rounds;
    the resume finds a state of 4 rounds, which it then serves whole."""

    def __init__(self) -> None:
        self.calls = 0

    def FetchState(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
        self.calls += 1
        committed = 3 if self.calls == 1 else 4
        for off in range(request.offset, 3 * PIECE, PIECE):
            yield pb.StateChunk(committed_rounds=committed, total_size=3 * PIECE, offset=off,
                                data=bytes([committed]) * PIECE, reference_fingerprint=str(committed) * 16)
            if self.calls == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the link broke")


def test_a_state_that_moves_on_once_still_downloads() -> None:
    stop = threading.Event()
    servicer = _MovesOnce()
    blob, _ = _fetch(servicer, stop)
    assert blob is not None and blob.committed == 4 and blob.blob == b"\4" * 3 * PIECE
    assert servicer.calls == 3  # the broken one, the resume that found a newer state, the download from 0


class _NeverWaits(pb_grpc.CoordinatorServicer):
    """Answers every Collect at once with DEADLINE_EXCEEDED — what an honest coordinator says only after it waited
    the call's ``wait_ms`` for the round to close; stops the member after ``GIVE_UP`` calls."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop, self.calls = stop, 0

    def Collect(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
        self.calls += 1
        if self.calls >= GIVE_UP:
            self.stop.set()
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "round 0 is still open")
        yield pb.CollectChunk()  # never reached: makes this a generator (a server stream)


def test_a_collect_answered_still_open_at_once_backs_off() -> None:
    """The finding, fixed: a Collect answered DEADLINE_EXCEEDED ("still open") was asked again at once, so a
    coordinator that says so without waiting kept the member calling it in a loop until the round's timeout. Now an
    answer that came before half the call's wait waits the retry backoff first."""
    stop = threading.Event()
    servicer = _NeverWaits(stop)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # the system clock: a ManualClock moves on with the stall watch's own waits, which would end the loop by itself
    transport = GrpcTransport(f"127.0.0.1:{port}", stop=stop, rpc_timeout_s=5.0)
    try:
        result = transport.collect(0, timeout_s=3.0, submitted=False)
    finally:
        transport.close()
        server.stop(0)
    assert result.status.name == "TIMED_OUT" and not stop.is_set(), f"{servicer.calls} calls"
    assert servicer.calls <= 8  # backoff 0.2, 0.4, 0.8, 1.6 s... within 3 s


class _ForgetsEveryPayload(pb_grpc.CoordinatorServicer):
    """Accepts every Submit, then answers Collect ABORTED ("no payload of yours is held": resubmit) at once — what an
    honest coordinator says once after it restarted; stops the member after ``GIVE_UP`` submissions."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop, self.submits = stop, 0

    def Submit(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        for _ in request_iterator:
            pass
        self.submits += 1
        if self.submits >= GIVE_UP:
            self.stop.set()
        return pb.SubmitResponse(round=0, received_bytes=1, accepted=True)

    def Collect(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
        context.set_trailing_metadata((("lowband-not-submitted", "1"),))
        context.abort(grpc.StatusCode.ABORTED, "no payload of yours for round 0 is held: submit it again")
        yield pb.CollectChunk()  # never reached: makes this a generator (a server stream)


def test_a_coordinator_that_forgets_every_payload_is_not_sent_it_in_a_loop() -> None:
    """The finding, fixed: Collect's ABORTED ("resubmit") sent the payload again at once, with no end but the round's
    timeout: a coordinator that says so every time had the member upload its frame in a loop. Now each resubmission
    after the first waits the retry backoff."""
    stop = threading.Event()
    servicer = _ForgetsEveryPayload(stop)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    transport = GrpcTransport(f"127.0.0.1:{port}", stop=stop, rpc_timeout_s=5.0)
    try:
        result = transport.exchange(0, b"\0" * 1000, timeout_s=3.0)
    finally:
        transport.close()
        server.stop(0)
    assert result.status.name == "TIMED_OUT" and not stop.is_set(), f"{servicer.submits} submissions"
    assert servicer.submits <= 8  # backoff 0.2, 0.4, 0.8, 1.6 s... within 3 s
