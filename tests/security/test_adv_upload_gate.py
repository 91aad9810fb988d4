"""Adversarial checks of upload admission control (coordinator/upload_gate.py, wired in coordinator/guard.py).

docs/security.md ("Uploads in flight") claims: a member holds at most one upload slot, a slot holder that goes quiet
or trickles loses it to the watchdog — "one member costs at most one slot for 30 s" — and no slot leaks on any
error path. Each test here is one way an adversary breaks that; each asserts the documented behaviour."""
from __future__ import annotations

import queue
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import grpc

from coordinator.guard import RpcGuard, ServerLimits
from coordinator.watchdog import Watchdog
from node.clock import ManualClock
from node.proto.lowband.v1 import coordinator_pb2 as pb
from security_harness import RPC_S, SERVICE, Idle, Trial, signed_metadata

WAIT_S = 20.0  # every wait for the server's bookkeeping


def _outcome(call: Callable[..., Any], *args: Any, **kw: Any) -> str:
    try:
        resp = call(*args, timeout=RPC_S, **kw)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "accepted" if resp.accepted else f"not accepted: {resp}"


def test_a_member_joining_again_under_its_own_name_takes_a_second_upload_slot(trial: Callable[..., Trial]) -> None:
    """The gate counts slots per *node id* (a session), not per member: a member that joins again with its own name
    and key — admitted at once, "it restarted: it takes its place back" — gets a fresh node id while the upload of
    its replaced session keeps its slot. Two idle uploads of one member then hold both of two slots and an honest
    member's upload is refused; repeated, one member holds every slot (each idle upload for idle_stream_s, and a
    rejoin costs one Join)."""
    clock = ManualClock()  # the watchdog never fires on its own: the slots stay held for as long as the test needs
    t = trial(watchdog_clock=clock, start_watchdog=False,
              limits=ServerLimits(upload_bytes=1, min_upload_slots=2, upload_wait_s=1.0))
    gate = t.server.uploads
    assert gate is not None and gate.slots == 2
    a, _b, m = t.join("a"), t.join("b"), t.join("m")
    r = t.core.open_round
    idle, held = Idle(), []
    try:
        first_session = m.transport.node_id
        held.append(t.stub().Submit.future(iter(idle), metadata=signed_metadata(
            m.transport.key, first_session, "Submit", submit=(r, 10)), timeout=120))
        assert gate.wait_until(lambda: gate.in_use == 1, WAIT_S)
        again = t.join("m", key=m.transport.key)  # the same name and key: the member itself, "restarted"
        assert again.transport.node_id != first_session
        held.append(t.stub().Submit.future(iter(idle), metadata=signed_metadata(
            m.transport.key, again.transport.node_id, "Submit", submit=(r, 10)), timeout=120))
        assert gate.wait_until(lambda: gate.in_use + gate.waiting == 2, WAIT_S)
        frame = t.frame("a", r)
        md = signed_metadata(a.transport.key, a.transport.node_id, "Submit", submit=(r, len(frame)))
        chunk = pb.SubmitChunk(node_id=a.transport.node_id, round=r, offset=0, total_size=len(frame), data=frame)
        outcome = _outcome(t.stub().Submit, iter([chunk]), metadata=md)
        assert outcome == "accepted", (f"member m holds {gate.in_use} of {gate.slots} upload slots (one per session "
                                       f"it joined), the honest upload got {outcome!r}")
    finally:
        idle.release()
        for c in held:
            c.cancel()


def _padded_chunk(node_id: str, round_: int, offset: int, total: int, data: bytes, pad: int) -> bytes:
    """A valid SubmitChunk followed by an unknown field (number 15, length-delimited) of ``pad`` bytes: the
    coordinator parses it as the same chunk, but the bytes count as upload progress."""
    body = pb.SubmitChunk(node_id=node_id, round=round_, offset=offset, total_size=total, data=data).SerializeToString()
    n, varint = pad, bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        varint.append(byte | (0x80 if n else 0))
        if not n:
            break
    return body + bytes([(15 << 3) | 2]) + bytes(varint) + b"\0" * pad


def test_a_slot_holder_cannot_keep_its_slot_with_bytes_that_carry_no_frame(trial: Callable[..., Trial]) -> None:
    """The watchdog's rate floor (min_stream_bps) counts the wire bytes of each chunk, not the frame bytes it carries:
    a member declares a 64-byte frame, then sends one frame byte per chunk padded with an unknown protobuf field (or
    any number of empty chunks). Every chunk is accepted (offset continues, data within total_size), the rate looks
    above the floor and the stream is never idle, so the slot is held as long as the sender likes — here 6 × 29 s of
    virtual time for 6 bytes of frame, while the documented bound is idle_stream_s + total_size × 8 / min_stream_bps
    (≈ 30 s). An honest upload waiting behind it is meanwhile refused."""
    clock = ManualClock()
    limits = ServerLimits(idle_stream_s=30.0, min_stream_bps=8000.0, upload_bytes=1, min_upload_slots=1,
                          upload_wait_s=WAIT_S)
    t = trial(watchdog_clock=clock, start_watchdog=False, limits=limits)
    gate, dog = t.server.uploads, t.server.watchdog
    assert gate is not None and gate.slots == 1
    m = t.join("m")
    r, total = t.core.open_round, 64
    sends: queue.Queue[bytes | None] = queue.Queue()

    def chunks() -> Iterator[bytes]:
        while (item := sends.get(timeout=120)) is not None:
            yield item

    submit = t.channel().stream_unary(SERVICE + "Submit", request_serializer=None,
                                      response_deserializer=pb.SubmitResponse.FromString)
    held = submit.future(chunks(), metadata=signed_metadata(m.transport.key, m.transport.node_id, "Submit",
                                                            submit=(r, total)), timeout=600)
    fired: list[str] = []
    try:
        assert gate.wait_until(lambda: gate.in_use == 1, WAIT_S)
        for i in range(6):
            # 32 KiB of padding: 32.8 s of "progress" at the 8 kbit/s floor, for one byte of frame
            sends.put(_padded_chunk(m.transport.node_id, r, i, total, b"x", pad=32 << 10))
            assert gate.wait_until(lambda i=i: (up := t.core.uploads.get(m.transport.node_id)) is not None
                                   and up.received == i + 1, WAIT_S), "the chunk was not taken"
            clock.advance(29.0)
            fired += [w.fired for w in dog.check() if "Submit" in w.what]
            if fired:
                break
        assert fired, (f"an upload held its slot for {clock.now():.0f} s of virtual time with "
                       f"{t.core.uploads[m.transport.node_id].received} of {total} frame bytes; the bound is "
                       f"{limits.idle_stream_s + total * 8 / limits.min_stream_bps:.1f} s")
    finally:
        sends.put(None)
        held.cancel()


class _EndedContext:
    """A servicer context of a call that ended (the client cancelled it) before the handler ran: gRPC's
    ``add_callback`` then returns False. Everything else as gRPC's, for an unauthenticated caller at one address."""

    def __init__(self, peer: str = "ipv4:203.0.113.9:4000") -> None:
        self._peer = peer

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple:
        return ()

    def set_trailing_metadata(self, md: Any) -> None:
        pass

    def cancel(self) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _LiveContext(_EndedContext):
    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True


def test_a_call_cancelled_before_its_handler_ran_gives_back_the_bounds_it_takes() -> None:
    """``RpcGuard._admit`` registers the release callback first; when gRPC says the call already ended
    (``add_callback`` False: the client cancelled between the call's arrival and its handler's start), it releases
    the call at once — and then goes on to take the call's counters (per address, anonymous / per member), which
    nothing releases any more. An unauthenticated client that opens calls and cancels them at once leaks one
    ``anonymous_rpcs`` slot per call that loses this race, until every GetRun/Join/Status is refused for good —
    for every node, since that bound is global; a member's Submit leaks its per-member bound the same way."""
    guard = RpcGuard(lambda node_id: None, ServerLimits(anonymous_rpcs=3),
                     Watchdog(ManualClock(), start=False))
    served: list[bytes] = []

    def continuation(details: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(lambda raw, ctx: served.append(raw) or b"")

    details = SimpleNamespace(method=SERVICE + "GetRun", invocation_metadata=())
    handler = guard.intercept_service(continuation, details)
    for _ in range(3):  # three calls the client cancelled before their handlers ran
        try:
            handler.unary_unary(b"", _EndedContext())
        except _Aborted:
            pass
    assert guard.anonymous.counts == {} and guard.by_peer.counts == {}, (
        f"calls that ended still hold bounds: anonymous {guard.anonymous.counts}, per address {guard.by_peer.counts}")
    served.clear()
    handler.unary_unary(b"", _LiveContext("ipv4:198.51.100.7:5000"))  # another node, from another address
    assert served == [b""]


def test_a_member_joining_again_cannot_hold_more_server_threads_than_its_bound(trial: Callable[..., Trial]) -> None:
    """``per_member_rpcs`` (4) is counted per node id too: a member that joins again under its own name and key gets a
    fresh node id — and a fresh 4 — while the calls of its replaced sessions go on. An upload that waits for a slot
    or sends nothing holds a server thread (up to idle_stream_s + upload_wait_s), and the server has exactly
    ``workers(max_nodes)`` threads, gRPC refusing calls beyond them: 11 sessions × 4 idle uploads take all 44, and
    an honest member's Heartbeat is refused."""
    clock = ManualClock()
    limits = ServerLimits(upload_wait_s=600.0)  # nothing ends by itself while the test looks
    t = trial(watchdog_clock=clock, start_watchdog=False, limits=limits, membership={"max_nodes": 4})
    workers = limits.workers(4)
    assert workers == 44 and limits.per_peer_rpcs >= workers
    a, m = t.join("a"), t.join("m")
    r = t.core.open_round
    idle, held = Idle(), []
    try:
        session = m
        for i in range(workers // limits.per_member_rpcs):
            if i:
                session = t.join("m", key=m.transport.key)  # the member itself, "restarted": a fresh node id
            for _ in range(limits.per_member_rpcs):
                held.append(t.stub().Submit.future(iter(idle), metadata=signed_metadata(
                    m.transport.key, session.transport.node_id, "Submit", submit=(r, 10)), timeout=120))
            # each call is held by the server (watched) or was refused at once (done)
            assert t.server.watchdog.wait_for(lambda n: n + sum(c.done() for c in held) == len(held), WAIT_S)
        outcome = "ok"
        try:
            a.transport.stub.Heartbeat(pb.HeartbeatRequest(node_id=a.transport.node_id), timeout=RPC_S)
        except grpc.RpcError as exc:
            outcome = f"{exc.code().name}: {exc.details()}"
        assert outcome == "ok", f"member m holds {len(held)} calls (bound {limits.per_member_rpcs}): {outcome}"
    finally:
        idle.release()
        for c in held:
            c.cancel()
