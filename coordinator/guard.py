"""The one check every call passes before any handler work: concurrency bounds, the caller's signature, and a
server-side deadline. A gRPC server interceptor (``RpcGuard``) wraps every method's handler:

1. **Bounds.** At most ``per_peer_rpcs`` calls at once from one IP address; at most ``per_member_rpcs`` per member
   (its key: every session of it), ``anonymous_rpcs`` in all for calls made before Join (GetRun, Join, Status) and
   ``prejoin_downloads`` state downloads before Join; health checks have their own few. Beyond them:
   RESOURCE_EXHAUSTED naming the bound, at once, with trailing metadata ``lowband-retry`` (the client retries; "the
   run is full" has none).
2. **Identity.** A member's call (Heartbeat, Leave, Submit, Collect, FetchState with a node id) must carry metadata
   signed by the member's registered key over the method, node id, timestamp, nonce and a digest of the exact request
   bytes (for Submit: the first chunk's round and total size, in metadata, checked before any chunk is read) —
   node/transport/grpc_auth.py builds it. A timestamp outside ±``skew_s`` of this machine's clock, a signature seen
   before, or one that does not verify is UNAUTHENTICATED; an unknown node id is NOT_FOUND (the node joins again).
   With mutual TLS the client certificate must name the member's key (``tls_node_key``). The request's own node_id
   must be the signed one, in every chunk. A FetchState before Join is signed the same way by the key it carries.
3. **Deadlines.** Every call is watched (coordinator/watchdog.py): unary calls end after ``unary_s``; streams
   after ``idle_stream_s`` without a message, or when they average less than ``min_stream_bps``; a Collect also
   after its wait (``collect_wait_s``) plus ``idle_stream_s`` before its first message.

Requests reach the wrapped handler deserialized as before; only the checks and the bookkeeping are added here.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc
from cryptography import x509

from coordinator.bounds import NODE_ID_RE, RateLimited, ReplayCache, printable
from coordinator.errors import Busy, Cancelled, CoordinatorError, Invalid, Unauthorized, UnknownNode
from coordinator.upload_gate import UploadGate
from coordinator.watchdog import Watch, Watchdog
from node.certs import NODE_KEY_URI  # a node certificate's URI SAN: the node key it speaks for
from node.identity import key_id, verify
from node.transport.grpc_auth import (MD_KEY, MD_NODE, MD_NONCE, MD_SIG, MD_SUBMIT, MD_TS, NONCE_HEX, SERVICE,
                                      UPLOAD_GO, request_digest, rpc_message, submit_digest)

log = logging.getLogger(__name__)
HEALTH_RPCS = 4
RETRY_MD = {"lowband-retry": "1"}  # on a RESOURCE_EXHAUSTED that is a passing bound (not "the run is full")
MEMBER_METHODS = frozenset(SERVICE + m for m in ("Heartbeat", "Leave", "Submit", "Collect"))
FETCH_STATE, COLLECT, SUBMIT = SERVICE + "FetchState", SERVICE + "Collect", SERVICE + "Submit"


@dataclass(frozen=True)
class ServerLimits:
    """Resource bounds of a coordinator (counts of concurrent calls; seconds; bits per second)."""

    per_member_rpcs: int = 4
    anonymous_rpcs: int = 16
    prejoin_downloads: int = 8
    per_peer_rpcs: int = 64
    unary_s: float = 30.0
    idle_stream_s: float = 30.0
    collect_wait_s: float = 60.0
    min_stream_bps: float = 1e6
    skew_s: float = 60.0
    upload_bytes: int = 32 << 20  # frames read and validated at once (coordinator/upload_gate.py); 0: no bound
    min_upload_slots: int = 4
    upload_wait_s: float = 30.0
    upload_read_ahead: int = 0  # bytes gRPC buffers per upload not read yet; 0: its BDP-probed windows (see below)

    def workers(self, max_nodes: int) -> int:
        """Server threads (and gRPC's maximum_concurrent_rpcs): every bound can be full at once."""
        return max_nodes * self.per_member_rpcs + self.anonymous_rpcs + self.prejoin_downloads + HEALTH_RPCS

    def stream_options(self) -> list[tuple[str, int]]:
        """gRPC server options for ``upload_read_ahead``. By default gRPC sizes every stream's receive window from
        the link's measured bandwidth-delay product (BDP probing), which a high-latency link needs for full speed —
        and an upload waiting for a slot is then sent that window's worth before it stops (measured on loopback: up
        to 8 MiB per waiting stream, BENCHMARKS.md). A fixed read-ahead turns BDP probing off and bounds each waiting
        stream to about that many bytes; a link whose bandwidth × RTT exceeds it then uploads below its rate."""
        if self.upload_read_ahead <= 0:
            return []
        return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", self.upload_read_ahead)]

    def upload_slots(self, frame_limit: int) -> int | None:
        """How many uploads at once for frames of at most ``frame_limit`` bytes (None: no bound): ``upload_bytes``
        of frames, at least ``min_upload_slots`` (a large model's frames would otherwise go one at a time, and on
        slow links a round's uploads would queue behind each other)."""
        if self.upload_bytes <= 0:
            return None
        return max(self.min_upload_slots, self.upload_bytes // max(1, frame_limit))


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5", "unix:/path")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


_CERT_KEYS: OrderedDict[bytes, bytes | None] = OrderedDict()
_CERT_LOCK = threading.Lock()


def tls_node_key(context: grpc.ServicerContext) -> bytes | None:
    """The node key named by the caller's TLS client certificate (its ``urn:lowband:node-key:HEX`` URI SAN), or None
    (no certificate, or it names none)."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    if not pems:
        return None
    pem = pems[0]
    with _CERT_LOCK:
        if pem in _CERT_KEYS:
            return _CERT_KEYS[pem]
    found = None
    try:
        cert = x509.load_pem_x509_certificate(pem)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        keys = [bytes.fromhex(u[len(NODE_KEY_URI):]) for u in uris if u.startswith(NODE_KEY_URI)]
        found = keys[0] if len(keys) == 1 and len(keys[0]) == 32 else None
    except (ValueError, x509.ExtensionNotFound):
        found = None
    with _CERT_LOCK:
        _CERT_KEYS[pem] = found
        while len(_CERT_KEYS) > 1024:
            _CERT_KEYS.popitem(last=False)
    return found


def _parse(deserialize: Callable[[bytes], Any], raw: bytes, method: str, context: grpc.ServicerContext) -> Any:
    """The request message, or INVALID_ARGUMENT when the bytes are not one (never an unhandled exception)."""
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except Exception:  # noqa: BLE001 — protobuf raises DecodeError (or worse) on hostile bytes
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the request is not a valid {method.rsplit('/', 1)[-1]} request message")


class _Counter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def take(self, key: str, limit: int) -> bool:
        with self.lock:
            if self.counts.get(key, 0) >= limit:
                return False
            self.counts[key] = self.counts.get(key, 0) + 1
            return True

    def give(self, key: str) -> None:
        with self.lock:
            n = self.counts.get(key, 0) - 1
            if n > 0:
                self.counts[key] = n
            else:
                self.counts.pop(key, None)


class _Call:
    """One admitted call: its slots (released once, when the call ends) and its watch."""

    def __init__(self, guard: "RpcGuard") -> None:
        self.guard = guard
        self.slots: list[tuple[_Counter, str]] = []
        self.watch: Watch | None = None
        self.node_id = ""
        self.member = ""  # a member's registered key (hex): the upload gate's unit — every session of the member
        self.public_key: bytes | None = None  # the signer of a FetchState before Join
        self.submit_head: tuple[int, int] | None = None
        self.upload_slot: UploadGate | None = None  # the gate whose slot this upload holds
        self.wake = threading.Event()  # set when the upload gate grants this call a slot, or when the call ends
        self._released = False
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        """The call ended (its slots were given back)."""
        return self._released

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.wake.set()  # a wait for an upload slot ends now (it sees ``released``)
        for counter, key in self.slots:
            counter.give(key)
        if self.upload_slot is not None:
            self.upload_slot.leave(self.member)
        if self.watch is not None:
            self.watch.done()


class RpcGuard(grpc.ServerInterceptor):
    """``member_key(node_id)``: the registered public key of a live member, or None. ``mtls``: client certificates
    are required and must name the member's key. ``wall``: unix time, for the timestamp window."""

    def __init__(self, member_key: Callable[[str], bytes | None], limits: ServerLimits, watchdog: Watchdog, *,
                 mtls: bool = False, wall: Callable[[], float] = time.time, uploads: UploadGate | None = None) -> None:
        self.member_key, self.limits, self.watchdog, self.mtls, self.wall = member_key, limits, watchdog, mtls, wall
        self.uploads = uploads  # admission control of uploads (coordinator/upload_gate.py); None: every one at once
        self.by_peer, self.by_member, self.anonymous, self.health = _Counter(), _Counter(), _Counter(), _Counter()
        self.replays: OrderedDict[str, ReplayCache] = OrderedDict()
        self._replay_lock = threading.Lock()
        self.warn = RateLimited(log)

    # -- the interceptor -----------------------------------------------------------------------------
    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        metadata = {k: v for k, v in (details.invocation_metadata or ())}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, metadata, handler), None, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(method, metadata, handler), None, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(method, metadata, handler), None, handler.response_serializer)
        return handler

    def _unary(self, method: str, md: dict[str, Any], handler: Any) -> Callable[[bytes, Any], Any]:
        def behavior(raw: bytes, context: grpc.ServicerContext) -> Any:
            call = self._admit(method, md, context, raw, self.limits.unary_s)
            request = _parse(handler.request_deserializer, raw, method, context)
            self._check_node_id(call, request, context)
            return handler.unary_unary(request, context)
        return behavior

    def _unary_stream(self, method: str, md: dict[str, Any], handler: Any) -> Callable[[bytes, Any], Iterator[Any]]:
        def behavior(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
            request = _parse(handler.request_deserializer, raw, method, context)
            first = self.limits.idle_stream_s
            if method == COLLECT:
                first += min(request.wait_ms / 1000.0, self.limits.collect_wait_s)
            call = self._admit(method, md, context, raw, None, first)
            self._check_node_id(call, request, context)
            for response in handler.unary_stream(request, context):
                yield response
                call.watch.progress(response.ByteSize())  # type: ignore[union-attr]
        return behavior

    def _stream_unary(self, method: str, md: dict[str, Any], handler: Any) -> Callable[[Iterator[bytes], Any], Any]:
        def behavior(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            gate = self.uploads if method == SUBMIT else None
            wait_s = gate.wait_s if gate is not None else 0.0
            call = self._admit(method, md, context, None, None, self.limits.idle_stream_s + wait_s)
            if gate is not None:
                self._enter_upload(gate, call, context)
            if method == SUBMIT:
                context.send_initial_metadata((UPLOAD_GO,))  # the node sends its chunks now (JoinResponse.upload_go)
            return handler.stream_unary(self._chunks(call, raws, handler.request_deserializer), context)
        return behavior

    def _enter_upload(self, gate: UploadGate, call: _Call, context: grpc.ServicerContext) -> None:
        """Hold one of the gate's slots before the upload's first chunk is read, or refuse the call."""
        if not gate.enter(call.member, call.wake, lambda: call.released):
            self.warn.info("uploads-full", "an upload waited %.0f s for one of %d upload slots: refused, to be retried",
                           gate.wait_s, gate.slots)
            context.set_trailing_metadata(tuple(RETRY_MD.items()))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"every one of the coordinator's {gate.slots} upload slots stayed taken for "
                          f"{gate.wait_s:.0f} s: try again shortly")
        with call._lock:
            released = call._released
            if not released:
                call.upload_slot = gate
        if released:  # the call ended as it got the slot: give it back
            gate.leave(call.member)
            return
        assert call.watch is not None
        call.watch.restart(self.limits.idle_stream_s)  # the wait was not the sender's: its clocks start now

    def _chunks(self, call: _Call, raws: Iterator[bytes], deserialize: Callable[[bytes], Any]) -> Iterator[Any]:
        first = True
        while True:
            try:
                raw = next(raws)
            except StopIteration:
                return
            except grpc.RpcError:  # the client went away, or the watchdog cancelled the call
                why = call.watch.fired if call.watch is not None else ""
                raise Cancelled(f"upload stream ended: {why or 'cancelled by the client'}") from None
            try:
                chunk = deserialize(raw)
            except Exception:  # noqa: BLE001 — protobuf raises DecodeError (or worse) on hostile bytes
                raise Invalid("an upload chunk is not a valid SubmitChunk message") from None
            # progress is the frame's bytes, not the wire's: padding (unknown fields) or empty chunks buy no time
            call.watch.progress(len(chunk.data))  # type: ignore[union-attr]
            if chunk.node_id != call.node_id:
                raise Unauthorized("every chunk of an upload must name the node id its call was signed for")
            if first and call.submit_head is not None and (chunk.round, chunk.total_size) != call.submit_head:
                raise Unauthorized(f"the first chunk's round/total_size ({chunk.round}, {chunk.total_size}) are not "
                                   f"the signed ones {call.submit_head}")
            first = False
            yield chunk

    # -- admission -----------------------------------------------------------------------------------
    def _admit(self, method: str, md: dict[str, Any], context: grpc.ServicerContext, raw: bytes | None,
               total_s: float | None, first_s: float | None = None) -> _Call:
        call = _Call(self)
        if not context.add_callback(call.release):  # it ended already: take nothing (no callback would give it back)
            call.release()
            context.abort(grpc.StatusCode.CANCELLED, "the call ended before it was served")
        try:
            self._take(call, method, md, context, raw)
        except CoordinatorError as exc:
            call.release()
            self.warn.info(f"{exc.code}:{peer_host(context.peer())}", "refused %s from %s: %s: %s",
                           method.rsplit("/", 1)[-1], printable(context.peer()), exc.code, printable(exc, 300))
            if exc.metadata:
                context.set_trailing_metadata(tuple(exc.metadata.items()))
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        idle = self.limits.idle_stream_s
        call.watch = self.watchdog.watch(context.cancel, f"{method.rsplit('/', 1)[-1]} from {context.peer()}",
                                         first_s=first_s if first_s is not None else (total_s or idle), idle_s=idle,
                                         total_s=total_s, min_bps=None if total_s else self.limits.min_stream_bps)
        return call

    def _take(self, call: _Call, method: str, md: dict[str, Any], context: grpc.ServicerContext,
              raw: bytes | None) -> None:
        lim = self.limits
        host = peer_host(context.peer())
        if not self.by_peer.take(host, lim.per_peer_rpcs):
            raise Busy(f"too many calls in progress from {host} (limit {lim.per_peer_rpcs})", RETRY_MD)
        call.slots.append((self.by_peer, host))
        if not method.startswith(SERVICE):
            if not self.health.take("", HEALTH_RPCS):
                raise Busy(f"too many health checks in progress (limit {HEALTH_RPCS})", RETRY_MD)
            call.slots.append((self.health, ""))
            return
        node_id = str(md.get(MD_NODE, ""))
        if method in MEMBER_METHODS or (method == FETCH_STATE and node_id):
            public = self._verify(call, method, md, context, raw, node_id, member=True)
            # counted per member key, not per session: a member joining again gets a fresh node id, not a fresh bound
            if not self.by_member.take(public.hex(), lim.per_member_rpcs):
                raise Busy(f"node {key_id(public)} already has {lim.per_member_rpcs} calls in progress (the limit)",
                           RETRY_MD)
            call.slots.append((self.by_member, public.hex()))
            call.node_id, call.member = node_id, public.hex()
            return
        if method == FETCH_STATE:  # a download before Join: long on a slow link, so a budget of its own
            call.public_key = self._verify(call, method, md, context, raw, "", member=False)
            if not self.anonymous.take("download", lim.prejoin_downloads):
                raise Busy(f"too many state downloads before Join in progress (limit {lim.prejoin_downloads}): "
                           "try again shortly, or join first", RETRY_MD)
            call.slots.append((self.anonymous, "download"))
            return
        if not self.anonymous.take("", lim.anonymous_rpcs):
            raise Busy(f"too many calls before Join in progress (limit {lim.anonymous_rpcs}): try again shortly",
                       RETRY_MD)
        call.slots.append((self.anonymous, ""))

    def _verify(self, call: _Call, method: str, md: dict[str, Any], context: grpc.ServicerContext,
                raw: bytes | None, node_id: str, member: bool) -> bytes:
        sig, ts_text, nonce = md.get(MD_SIG), str(md.get(MD_TS, "")), str(md.get(MD_NONCE, ""))
        if not isinstance(sig, bytes) or not ts_text or not nonce:
            raise Unauthorized("this call must be signed by the node's key (metadata lowband-ts, lowband-nonce, "
                               "lowband-sig-bin): a node id alone authorises nothing")
        if not ts_text.lstrip("-").isdigit() or len(ts_text) > 20 or len(nonce) != NONCE_HEX:
            raise Unauthorized("malformed lowband-ts or lowband-nonce metadata")
        off = int(ts_text) / 1000.0 - self.wall()
        if abs(off) > self.limits.skew_s:
            raise Unauthorized(f"request timestamp is {off:+.0f} s off the coordinator's clock (allowed ±"
                               f"{self.limits.skew_s:.0f} s): check this machine's clock (NTP)")
        if member:
            if not NODE_ID_RE.fullmatch(node_id):
                raise Unauthorized("lowband-node-id metadata is not a node id")
            public = self.member_key(node_id)
            if public is None:
                raise UnknownNode(f"unknown node id {node_id[:8]}…: never joined, left, replaced by a restart of the "
                                  "same node, or its lease expired; join again")
        else:
            public = md.get(MD_KEY)
            if not isinstance(public, bytes) or len(public) != 32:
                raise Unauthorized("a download before Join must carry the node's public key (lowband-key-bin) and be "
                                   "signed by it")
        if method == SUBMIT:
            head = str(md.get(MD_SUBMIT, ""))
            r, sep, total = head.partition(":")
            if not sep or not r.isdigit() or not total.isdigit() or len(head) > 41:
                raise Unauthorized("an upload must name its round and total size in lowband-submit metadata")
            digest = submit_digest(int(r), int(total))
            call.submit_head = (int(r), int(total))  # the first chunk is checked against it (``_chunks``)
        else:
            digest = request_digest(raw or b"")
        if not verify(public, sig, rpc_message(method, node_id, int(ts_text), nonce, digest)):
            raise Unauthorized(f"request signature does not verify with the key of node {key_id(public)}")
        if self._replays(node_id or key_id(public)).seen(sig, self.wall()):
            raise Unauthorized("replayed request: this signature was already used")
        if self.mtls and member and tls_node_key(context) != public:
            raise Unauthorized(f"the TLS client certificate does not name this member's key {key_id(public)}")
        return public

    def _replays(self, who: str) -> ReplayCache:
        with self._replay_lock:
            cache = self.replays.get(who)
            if cache is None:
                cache = self.replays[who] = ReplayCache(2 * self.limits.skew_s + 1)
                while len(self.replays) > 4096:
                    self.replays.popitem(last=False)
            self.replays.move_to_end(who)
            return cache

    def _check_node_id(self, call: _Call, request: Any, context: grpc.ServicerContext) -> None:
        named = getattr(request, "node_id", None)
        if named is not None and named != call.node_id:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "the request names another node id than the one its call was signed for")

