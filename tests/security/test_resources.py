"""Bounded resources over real gRPC: idle upload streams do not stop rounds, cancelled collects free their threads at
once, calls beyond a bound are refused at once (per address, per member), an idle upload is cancelled by the
server's deadline, every field from the network is bounded, and a bug answers INTERNAL while a node gives up on a
coordinator that keeps failing."""
from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import grpc
import pytest

from coordinator.core import PROTOCOL_VERSION
from coordinator.guard import ServerLimits
from coordinator.store import Disk
from node.clock import ManualClock
from node.identity import NodeKey
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.transport.grpc_client import MAX_FAULTS, CoordinatorFault, GrpcTransport
from node.transport.grpc_auth import join_message
from security_harness import RPC_S, Idle, Trial, rpc_error, signed_metadata

WAIT_S = 20.0  # every wait for the server's bookkeeping


def test_idle_upload_streams_do_not_stop_rounds(trial: Callable[..., Trial]) -> None:
    """40 upload streams that never send a chunk — unauthenticated, in a captured node's name, and from a member of
    the run with its own key — while two honest nodes commit rounds."""
    limits = ServerLimits(per_member_rpcs=4)
    t = trial(limits=limits)
    a, b = t.join("a"), t.join("b")
    r = t.honest_round()
    assert a.transport.submit(r + 1, t.frame("a", r + 1)) == "accepted"
    m = t.join("mallory")  # joins round r + 2: rounds r + 1 need not wait for it
    stub, idle, held = t.stub(), Idle(), []
    done = threading.Semaphore(0)
    try:
        for i in range(40):
            if i < 16:  # no credentials at all, then a's captured node id without a's key
                md = [] if i < 8 else signed_metadata(NodeKey.generate(), a.transport.node_id, "Submit",
                                                      submit=(r + 1, 10))
            else:
                md = signed_metadata(m.transport.key, m.transport.node_id, "Submit", submit=(r + 2, 10))
            call = stub.Submit.future(iter(idle), metadata=md, timeout=120)
            call.add_done_callback(lambda _: done.release())
            held.append(call)
        # all but the member's 4 are answered at once, while their clients still hold the streams open
        assert all(done.acquire(timeout=WAIT_S) for _ in range(40 - limits.per_member_rpcs))
        codes = [c.exception().code() for c in held if c.done()]
        assert codes[:16] == [grpc.StatusCode.UNAUTHENTICATED] * 16
        assert codes[16:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (24 - limits.per_member_rpcs)
        assert t.server.watchdog.wait_for(lambda n: n == limits.per_member_rpcs, WAIT_S)
        # the member's 4 streams are held (its bound); honest rounds commit meanwhile
        b_frame = t.frame("b", r + 1)
        assert b.transport.submit(r + 1, b_frame) == "accepted"
        for node in (a, b):
            res = node.transport.collect(r + 1, 30, own=t.frame(node.name, r + 1), own_name=node.name)
            assert res.committed and node.worker.apply(res).committed
        assert sum(not c.done() for c in held) == limits.per_member_rpcs  # still held: the bound, not a timeout
        t.core.leave(m.transport.node_id, "test")
        t.members.pop("mallory")
        assert t.honest_round() == r + 2
    finally:
        idle.release()
        for c in held:
            c.cancel()


def test_cancelled_collects_free_their_threads_at_once(trial: Callable[..., Trial]) -> None:
    """A server with 15 threads: 40 collects that wait on an open round and are cancelled one after the other each
    get a thread (the cancelled ones free theirs at once), and the round then commits."""
    limits = ServerLimits(per_member_rpcs=2, anonymous_rpcs=2, prejoin_downloads=1)
    t = trial(limits=limits, membership={"max_nodes": 4})
    assert limits.workers(4) == 15
    a, _ = t.join("a"), t.join("b")
    dog = t.server.watchdog
    request = pb.CollectRequest(node_id=a.transport.node_id, round=0, wait_ms=60_000, submitted=False)
    for _ in range(40):
        call = a.transport.stub.Collect(request, timeout=120)
        assert dog.wait_for(lambda n: n == 1, WAIT_S), "the collect never got a server thread"
        call.cancel()
        assert dog.wait_for(lambda n: n == 0, WAIT_S), "a cancelled collect kept its slot"
    t.core.observers.clear()
    assert t.honest_round() == 0


def test_calls_beyond_the_bound_per_address_are_refused_at_once(trial: Callable[..., Trial]) -> None:
    t = trial(limits=ServerLimits(per_peer_rpcs=3))
    a = t.join("a")
    idle, stub = Idle(), t.stub()
    calls = [stub.Submit.future(iter(idle), metadata=signed_metadata(a.transport.key, a.transport.node_id, "Submit",
                                                                     submit=(0, 10)), timeout=120) for _ in range(3)]
    try:
        assert t.server.watchdog.wait_for(lambda n: n == 3, WAIT_S)
        err = rpc_error(stub.GetRun, pb.GetRunRequest(protocol_version=PROTOCOL_VERSION))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details() == "too many calls in progress from 127.0.0.1 (limit 3)"
        assert dict(err.trailing_metadata())["lowband-retry"] == "1"  # a passing bound: nodes retry it
    finally:
        idle.release()
        for c in calls:
            c.cancel()
    assert t.server.watchdog.wait_for(lambda n: n == 0, WAIT_S)
    assert stub.GetRun(pb.GetRunRequest(protocol_version=PROTOCOL_VERSION), timeout=RPC_S).run_id == "security"


def test_an_upload_that_sends_nothing_is_cancelled_by_the_server(trial: Callable[..., Trial]) -> None:
    clock = ManualClock()
    t = trial(watchdog_clock=clock, start_watchdog=False, limits=ServerLimits(idle_stream_s=30.0))
    a = t.join("a")
    idle = Idle()
    call = t.stub().Submit.future(iter(idle), metadata=signed_metadata(
        a.transport.key, a.transport.node_id, "Submit", submit=(0, 10)), timeout=120)
    try:
        dog = t.server.watchdog
        assert dog.wait_for(lambda n: n == 1, WAIT_S)
        clock.advance(29.0)
        assert dog.check() == [] and not call.done()
        clock.advance(2.0)
        fired = dog.check()
        assert [w.fired for w in fired] == ["nothing moved in 31 s"]
        assert call.exception(timeout=WAIT_S).code() == grpc.StatusCode.CANCELLED
    finally:
        idle.release()


def _join(t: Trial, **fields: Any) -> pb.JoinRequest:
    key, i = NodeKey.generate(), t.info
    name = fields.get("node_name", "ok")
    import time

    ts = int(time.time() * 1000)
    base: dict[str, Any] = dict(node_name=name, protocol_version=PROTOCOL_VERSION, config_json=i.config_json,
                                config_hash=i.config_hash,
                                task_fingerprint=i.task_fingerprint, model_digest=i.model_digest, public_key=key.public,
                                timestamp_ms=ts, signature=key.sign(join_message("security", name, key.public, ts)))
    base.update(fields)
    return pb.JoinRequest(**base)


@pytest.mark.parametrize("fields, code, message", [
    ({"node_name": "n1\n12:00:00 I coordinator: forged line"}, "INVALID_ARGUMENT",
     "node_name: node name 'n1\\n12:00:00 I coordinator: forged line' is not 1–64 characters"),
    ({"node_name": "\x1b[31mred"}, "INVALID_ARGUMENT", "node_name: node name '\\x1b[31mred' is not"),
    ({"config_json": "[" * 100_000 + "]" * 100_000}, "INVALID_ARGUMENT",
     "config_json: 200000 characters exceed the limit of 65536"),
    ({"config_json": "[" * 20 + "]" * 20}, "INVALID_ARGUMENT", "config_json: nested deeper than 16 levels"),
    ({"config_json": json.dumps("x" * (7_900_000 // 2))}, "INVALID_ARGUMENT", "characters exceed the limit of 65536"),
    ({"config_json": "[1, 2]"}, "INVALID_ARGUMENT", "config_json: must be a JSON object"),
    ({"capabilities": ["x" * 64] * 17}, "INVALID_ARGUMENT", "capabilities: 17 given, at most 16"),
    ({"capabilities": ["x" * 65]}, "INVALID_ARGUMENT", "is not 1–64 characters of letters, digits and '._=:/+-'"),
    ({"capabilities": ["device=cpu\n"]}, "INVALID_ARGUMENT", "capabilities: 'device=cpu\\n' is not"),
    ({"config_hash": "zz"}, "INVALID_ARGUMENT", "config_hash: must be 1–128 lowercase hex characters"),
    ({"public_key": b"short"}, "INVALID_ARGUMENT", "public_key: must be the node's 32-byte ed25519 public key"),
    ({"join_token": "t" * 300}, "INVALID_ARGUMENT", "join_token: 300 characters exceed the limit of 256"),
])
def test_every_join_field_is_bounded_with_a_precise_message(trial: Callable[..., Trial], fields: dict[str, Any],
                                                            code: str, message: str) -> None:
    t = trial()
    err = rpc_error(t.stub().Join, _join(t, **fields))
    assert err.code() == getattr(grpc.StatusCode, code) and message in err.details(), err.details()
    assert t.core.members == {}


def test_bytes_that_are_no_request_are_invalid_argument_not_a_crash(trial: Callable[..., Trial]) -> None:
    t = trial()
    a = t.join("a")
    ch = t.channel()
    garbage = b"\xff\xff\xff\xff\x0f"
    for method in ("GetRun", "Join", "Status"):
        err = rpc_error(ch.unary_unary(f"/lowband.v1.Coordinator/{method}"), garbage)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err)
        assert err.details() == f"the request is not a valid {method} request message"
    err = rpc_error(ch.stream_unary("/lowband.v1.Coordinator/Submit"), iter([garbage]),
                    metadata=signed_metadata(a.transport.key, a.transport.node_id, "Submit", submit=(0, 10)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid SubmitChunk" in err.details()
    t.join("b")
    assert t.honest_round() == 0


def test_a_bug_answers_internal_and_the_server_keeps_serving(trial: Callable[..., Trial]) -> None:
    class Buggy(Disk):
        armed = False

        def write_atomic(self, path: Any, data: bytes) -> None:
            if self.armed:
                raise RuntimeError("a bug in the store")
            super().write_atomic(path, data)

    disk = Buggy()
    t = trial(disk=disk)
    a, b = t.join("a"), t.join("b")
    disk.armed = True
    assert a.transport.submit(0, t.frame("a", 0)) == "accepted"
    err = rpc_error(b.transport.stub.Submit, iter([pb.SubmitChunk(node_id=b.transport.node_id, round=0, offset=0,
                                                                  total_size=len(t.frame("b", 0)),
                                                                  data=t.frame("b", 0))]))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error in Submit (RuntimeError); the coordinator logged it"
    disk.armed = False
    assert t.stub().Status(pb.StatusRequest(), timeout=RPC_S).run_id == "security"


def test_a_node_gives_up_after_a_bounded_number_of_internal_errors(trial: Callable[..., Trial]) -> None:
    class AlwaysInternal(grpc.UnaryUnaryClientInterceptor):
        calls = 0

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            AlwaysInternal.calls += 1
            raise _Internal()

    class _Internal(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INTERNAL

        def details(self) -> str:
            return "internal error in GetRun (KeyError); the coordinator logged it"

    t = trial()
    clock = ManualClock()
    node = GrpcTransport(t.address, threading.Event(), interceptors=[AlwaysInternal()], clock=clock)
    try:
        with pytest.raises(CoordinatorFault, match=f"answered GetRun with INTERNAL {MAX_FAULTS} times in a row"):
            node.get_run()
    finally:
        node.close()
    assert AlwaysInternal.calls == MAX_FAULTS and clock.slept > 0  # backed off between tries, on virtual time


class _Exhausted(grpc.RpcError):
    def __init__(self, retry: bool) -> None:
        self.retry = retry

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "too many calls in progress from 10.0.0.1 (limit 64)" if self.retry else "the run is full (4 members)"

    def trailing_metadata(self) -> tuple:
        return (("lowband-retry", "1"),) if self.retry else ()


def test_a_node_retries_a_passing_bound_but_not_a_full_run(trial: Callable[..., Trial]) -> None:
    class BusyTwice(grpc.UnaryUnaryClientInterceptor):
        calls = 0

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            BusyTwice.calls += 1
            if BusyTwice.calls <= 2:
                raise _Exhausted(retry=True)
            if isinstance(request, pb.JoinRequest):
                raise _Exhausted(retry=False)
            return continuation(details, request)

    t = trial()
    clock = ManualClock()
    node = GrpcTransport(t.address, threading.Event(), interceptors=[BusyTwice()], clock=clock)
    try:
        assert node.get_run().run_id == "security" and BusyTwice.calls == 3 and clock.slept > 0
        node.identity = t.identity("a")
        from node.transport.control import JoinRefused

        with pytest.raises(JoinRefused, match="RESOURCE_EXHAUSTED: the run is full"):
            node.join()
    finally:
        node.close()


@contextlib.contextmanager
def an_idle_upload(t: Trial, member: Any, round_: int) -> Iterator[Any]:
    """``member`` opens an upload for ``round_`` and sends nothing (it takes a slot if one is free); the call, open
    until the block ends."""
    idle = Idle()
    held = t.stub().Submit.future(iter(idle), metadata=signed_metadata(
        member.transport.key, member.transport.node_id, "Submit", submit=(round_, 10)), timeout=120)
    try:
        yield held
    finally:
        idle.release()
        held.cancel()


def test_uploads_beyond_the_gate_wait_for_a_slot_and_a_slot_holder_that_sends_nothing_loses_it(
        trial: Callable[..., Trial]) -> None:
    """One upload slot (coordinator/upload_gate.py): a member that opens an upload and sends nothing holds it, an
    honest upload waits for it — reading nothing meanwhile — and goes through once the server's deadline cancels the
    idle one; a round then commits as usual."""
    clock = ManualClock()
    t = trial(watchdog_clock=clock, start_watchdog=False,
              limits=ServerLimits(idle_stream_s=30.0, upload_bytes=1, min_upload_slots=1, upload_wait_s=WAIT_S))
    gate = t.server.uploads
    assert gate is not None and gate.slots == 1
    a, b = t.join("a"), t.join("b")
    r = t.core.open_round
    with an_idle_upload(t, b, r) as held:
        assert gate.wait_until(lambda: gate.in_use == 1, WAIT_S)
        with ThreadPoolExecutor(1) as pool:
            honest = pool.submit(a.transport.submit, r, t.frame("a", r), 2.0)
            assert gate.wait_until(lambda: gate.waiting == 1, WAIT_S)
            assert not honest.done() and a.transport.node_id not in t.core.submitted
            clock.advance(31.0)  # b's idle upload outlives its deadline: cancelled, its slot freed
            assert [w.fired for w in t.server.watchdog.check() if "Submit" in w.what] == ["nothing moved in 31 s"]
            assert held.exception(timeout=WAIT_S).code() == grpc.StatusCode.CANCELLED
            assert honest.result(WAIT_S) == "accepted"
        assert gate.waited == 1
        assert t.members["b"].transport.submit(r, t.frame("b", r), loss=2.0) == "accepted"
        for m in (a, b):
            res = m.transport.collect(r, 30, submitted=True, own=t.frame(m.name, r), own_name=m.name)
            assert res.committed and res.members == ("a", "b") and m.worker.apply(res).committed


def test_an_upload_that_waits_too_long_for_a_slot_is_refused_with_the_retry_hint(trial: Callable[..., Trial]) -> None:
    t = trial(limits=ServerLimits(upload_bytes=1, min_upload_slots=1, upload_wait_s=0.3))
    a, b = t.join("a"), t.join("b")
    r = t.core.open_round
    with an_idle_upload(t, b, r):
        gate = t.server.uploads
        assert gate is not None and gate.wait_until(lambda: gate.in_use == 1, WAIT_S)
        frame = t.frame("a", r)
        md = signed_metadata(a.transport.key, a.transport.node_id, "Submit", submit=(r, len(frame)))
        chunk = pb.SubmitChunk(node_id=a.transport.node_id, round=r, offset=0, total_size=len(frame), data=frame)
        err = rpc_error(t.stub().Submit, iter([chunk]), metadata=md)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details() == "every one of the coordinator's 1 upload slots stayed taken for 0 s: try again shortly"
        assert dict(err.trailing_metadata())["lowband-retry"] == "1"  # a passing bound: the node retries
        assert gate.in_use == 1 and gate.waiting == 0


def test_a_fixed_upload_read_ahead_turns_bdp_probing_off_and_rounds_go_on(trial: Callable[..., Trial]) -> None:
    """``--upload-read-ahead-kib``: gRPC's windows fixed instead of sized by BDP probing (ServerLimits.stream_options);
    the default leaves gRPC's own. A coordinator started with it commits rounds as usual."""
    assert ServerLimits().stream_options() == []
    limits = ServerLimits(upload_read_ahead=256 << 10)
    assert limits.stream_options() == [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256 << 10)]
    t = trial(limits=limits)
    t.join("a"), t.join("b")
    assert t.honest_round() == 0 and t.honest_round() == 1


class PullRecorder(grpc.StreamUnaryClientInterceptor):
    """The transport's ``interceptors`` seam: records, for each Submit, the chunks gRPC pulls from the node's request
    iterator (what it is about to send): ``asked`` is set when gRPC asks for the chunk after the head, ``data`` when
    a chunk carrying frame bytes is handed over."""

    def __init__(self) -> None:
        self.asked, self.data = threading.Event(), threading.Event()

    def intercept_stream_unary(self, continuation: Any, details: grpc.ClientCallDetails, chunks: Any) -> Any:
        def pulled() -> Any:
            for i, chunk in enumerate(chunks):
                yield chunk
                if i == 0:
                    self.asked.set()
                if chunk.data:
                    self.data.set()
        return continuation(details, pulled())


def test_an_upload_waiting_for_a_slot_sends_no_frame_bytes_until_the_coordinator_says_go(
        trial: Callable[..., Trial]) -> None:
    """JoinResponse.upload_go: the node sends its upload's head (round and size, no bytes) and then waits for the
    coordinator's initial metadata lowband-upload = go, sent once the upload holds a slot — so an upload that waits
    costs the coordinator no read-ahead of its frame. Here the only slot is held by an idle upload; the honest
    upload's frame bytes leave only once that one is cancelled."""
    clock = ManualClock()
    t = trial(watchdog_clock=clock, start_watchdog=False,
              limits=ServerLimits(idle_stream_s=30.0, upload_bytes=1, min_upload_slots=1, upload_wait_s=WAIT_S))
    gate = t.server.uploads
    a, b = t.join("a"), t.join("b")
    assert a.transport.join_response is not None and a.transport.join_response.upload_go
    recorder = PullRecorder()
    honest = t.transport(key=a.transport.key, interceptors=[recorder])
    honest.node_id, honest.identity, honest.join_response = (a.transport.node_id, a.transport.identity,
                                                             a.transport.join_response)
    r = t.core.open_round
    with an_idle_upload(t, b, r):
        assert gate is not None and gate.wait_until(lambda: gate.in_use == 1, WAIT_S)
        with ThreadPoolExecutor(1) as pool:
            upload = pool.submit(honest.submit, r, t.frame("a", r), 2.0)
            assert gate.wait_until(lambda: gate.waiting == 1, WAIT_S)
            assert recorder.asked.wait(WAIT_S)  # gRPC sent the head and asks for the frame's first chunk ...
            assert not recorder.data.wait(0.5)  # ... which the node holds back while the upload waits
            clock.advance(31.0)
            t.server.watchdog.check()  # the idle holder loses the slot: go
            assert upload.result(WAIT_S) == "accepted" and recorder.data.is_set()
