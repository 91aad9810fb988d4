"""Adversarial review (adv-today): the state a fresh node downloads while it starts up (node/transport/state_prefetch.py),
before its model is built, against a hostile coordinator: a bare gRPC servicer that answers FetchState with a state
announced as 48 GiB and hands out one 1 MiB piece each time the test lets it.

- ``test_a_prefetch_is_held_to_the_nodes_bounds_once_its_model_is_known`` — the finding, fixed: the download before
  Join is held only to ``UNKNOWN_MODEL`` (a state up to 64 GiB), and the node never narrowed it once it knew its
  model: a hostile coordinator (or anyone on the path of a plaintext run) could fill a fresh node's memory with tens
  of GiB. Now the daemon hands its model's bounds to the download in flight (``StatePrefetch.bound``, called with
  the plane's ``bound_results`` after Join); the download stops at its next piece.
"""
from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Iterator

import grpc

from node.identity import NodeKey
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.transport.limits import ResultLimits
from node.transport.state_prefetch import StatePrefetch

PIECE = 1 << 20
ANNOUNCED = 48 << 30  # under UNKNOWN_MODEL's 64 GiB
MODEL = ResultLimits(frame=1 << 20, aggregate=1 << 20, members=4, state=64 << 20)


class _Huge(pb_grpc.CoordinatorServicer):
    def __init__(self) -> None:
        self.pulled = 0
        self.sent = threading.Event()  # a piece went out
        self.go = threading.Event()  # the test lets the rest go

    def FetchState(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802 (gRPC's name)
        for off in range(request.offset, ANNOUNCED, PIECE):
            if not context.is_active() or self.pulled >= 256 * PIECE:
                return
            if self.pulled == PIECE and not self.go.wait(30):
                return
            self.pulled += PIECE
            yield pb.StateChunk(committed_rounds=3, total_size=ANNOUNCED, offset=off, data=b"\0" * PIECE,
                                reference_fingerprint="0" * 16)
            self.sent.set()


def test_a_prefetch_is_held_to_the_nodes_bounds_once_its_model_is_known() -> None:
    servicer = _Huge()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    prefetch = StatePrefetch(f"127.0.0.1:{port}", "token", timeout_s=60.0, key=NodeKey.generate())
    try:
        assert servicer.sent.wait(30)  # the download runs under the generous bounds
        prefetch.bound(MODEL)  # the node built its model and joined
        servicer.go.set()
        assert prefetch.take(threading.Event()) is None
        assert servicer.pulled <= 16 * PIECE  # it stopped at once, not after the 256 MiB the servicer offers
    finally:
        servicer.go.set()
        prefetch.cancel()
        server.stop(0)
