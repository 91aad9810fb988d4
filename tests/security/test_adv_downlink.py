"""Adversarial checks of what a member reads from a coordinator (node/transport/grpc_result.py, node/transport/limits.py):
a hostile coordinator against a member. The coordinator here is a bare gRPC servicer that answers Collect and
FetchState only, and counts what the member pulled from it; the member's bounds are its own model's."""
from __future__ import annotations

from concurrent import futures
from typing import Any, Callable, Iterator

import grpc
import pytest

from node import wire
from node.compress import make_codec
from node.config import TaskConfig
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.recipes import make_run_config
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train.reference import Reference
from node.transport.grpc_client import GrpcTransport, StateRefused
from node.transport.limits import ResultLimits
from node.transport.messages import RoundStatus

PIECE = 1 << 20
STREAMED = 96 << 20  # what the hostile coordinator streams at most; any size would do
BOUND = 8 << 20  # what a member may have pulled at most before it stops reading (gRPC's flow-control window included)


@pytest.fixture(scope="module")
def reference() -> Reference:
    cfg = make_run_config("sign", {}, task=TaskConfig("gpt", {"size": "tiny", "batch_size": 2, "block_size": 32}),
                          workers=2, rounds=4)
    task = load_task(cfg.task.name, **cfg.task.params)
    return Reference.for_model(cfg, build_seeded(task, cfg.seed))


@pytest.fixture(scope="module")
def limits(reference: Reference) -> ResultLimits:
    return ResultLimits.for_model(reference, 8)


class _Hostile(pb_grpc.CoordinatorServicer):
    """Answers Collect with ``header`` then 1 MiB pieces of part ``member`` up to ``STREAMED`` bytes, and FetchState
    with chunks of a state announced as ``state_size`` bytes; counts the bytes the member pulled."""

    def __init__(self, header: pb.CollectHeader, member: int = 0, state_size: int = 0) -> None:
        self.header, self.member, self.state_size = header, member, state_size
        self.pulled = 0

    def Collect(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802 (gRPC's name)
        yield pb.CollectChunk(header=self.header)
        piece = b"\x00" * PIECE
        for off in range(0, STREAMED, PIECE):
            if not context.is_active():
                return
            self.pulled += PIECE
            yield pb.CollectChunk(piece=pb.PayloadPiece(member=self.member, offset=off, data=piece))

    def FetchState(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
        piece = b"\x00" * PIECE
        for off in range(request.offset, min(self.state_size, STREAMED), PIECE):
            if not context.is_active():
                return
            self.pulled += PIECE
            yield pb.StateChunk(committed_rounds=3, total_size=self.state_size, offset=off, data=piece,
                                reference_fingerprint="0" * 16)


def _against(servicer: _Hostile, limits: ResultLimits, call: Callable[[GrpcTransport], Any]) -> Any:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    transport = GrpcTransport(f"127.0.0.1:{port}", rpc_timeout_s=5.0)
    transport.limits = limits
    try:
        return call(transport)
    finally:
        transport.close()
        server.stop(0)


def _collect(transport: GrpcTransport) -> Any:
    return transport.collect(0, timeout_s=20.0, submitted=False)


def test_the_bounds_come_from_the_members_model(reference: Reference, limits: ResultLimits) -> None:
    """Every honest frame and aggregate of the model fits its bounds, and they are not far above it (a member reads
    at most a small multiple of what an honest answer takes)."""
    frame = wire.expected_size(reference.codec, reference.spec, "r" * 64, "n" * 64, signed=True)
    dense = wire.expected_size(make_codec("identity"), reference.spec, "r" * 64, "n" * 64)
    assert frame <= limits.frame <= 2 * frame + (64 << 10)
    assert dense <= limits.aggregate <= 2 * dense + (64 << 10)
    assert limits.members == 8
    assert len(reference.to_bytes()) <= limits.state


def test_an_aggregate_announced_larger_than_the_model_is_refused_unread(limits: ResultLimits) -> None:
    header = pb.CollectHeader(round=0, committed=True, members=["a"], reference_fingerprint="0" * 16,
                              aggregate_size=STREAMED, aggregate_codec="sign")
    servicer = _Hostile(header)
    result = _against(servicer, limits, _collect)
    assert result.status is RoundStatus.MALFORMED and "aggregate is announced" in result.reason
    assert servicer.pulled <= BOUND


def test_pieces_past_the_announced_size_end_the_read(limits: ResultLimits) -> None:
    """The header announces an honest size; the coordinator streams far more."""
    header = pb.CollectHeader(round=0, committed=True, members=["a", "b"], reference_fingerprint="0" * 16,
                              payload_sizes=[1000, 1000])
    servicer = _Hostile(header, member=1)
    result = _against(servicer, limits, _collect)
    assert result.status is RoundStatus.MALFORMED and "past its announced" in result.reason
    assert servicer.pulled <= BOUND


@pytest.mark.parametrize("header, why", [
    (pb.CollectHeader(round=0, committed=True, members=[f"m{i}" for i in range(9)], payload_sizes=[10] * 9),
     "more than the run's 8"),
    (pb.CollectHeader(round=0, committed=True, members=["a"], payload_sizes=[STREAMED]), "a frame is announced"),
    (pb.CollectHeader(round=0, committed=True, members=["a", "b"], payload_sizes=[10]), "1 sizes for 2 members"),
])
def test_a_header_beyond_the_runs_bounds_is_refused(limits: ResultLimits, header: Any, why: str) -> None:
    servicer = _Hostile(header, member=0)
    result = _against(servicer, limits, _collect)
    assert result.status is RoundStatus.MALFORMED and why in result.reason, result.reason
    assert servicer.pulled <= BOUND


def test_pieces_before_the_header_or_for_no_member_are_refused(limits: ResultLimits) -> None:
    header = pb.CollectHeader(round=0, committed=True, members=["a"], payload_sizes=[1000])
    servicer = _Hostile(header, member=5)
    result = _against(servicer, limits, _collect)
    assert result.status is RoundStatus.MALFORMED and "part 5 of 1" in result.reason


def test_a_state_announced_larger_than_the_model_is_refused(limits: ResultLimits) -> None:
    servicer = _Hostile(pb.CollectHeader(), state_size=limits.state + 1)
    with pytest.raises(StateRefused, match="more than the"):
        _against(servicer, limits, lambda t: t.fetch_state(timeout_s=20.0))
    assert servicer.pulled <= BOUND


def test_an_honest_state_under_the_bound_downloads(limits: ResultLimits) -> None:
    """The check on the state's size refuses nothing honest: a state within the bound arrives whole."""
    servicer = _Hostile(pb.CollectHeader(), state_size=3 * PIECE)
    blob = _against(servicer, limits, lambda t: t.fetch_state(timeout_s=20.0))
    assert blob is not None and len(blob.blob) == 3 * PIECE and blob.committed == 3


@pytest.mark.parametrize("outer", ["adamw", "nesterov", "sign_momentum"])
def test_the_largest_honest_state_fits_the_state_bound(outer: str) -> None:
    """adv-today: the state bound (4 × the model in fp32 + buffers, + 16 MiB) holds the coordinator's largest state:
    AdamW's two buffers and the compressed downlink's residual beside θ_ref take exactly 4 ×. A model of 5 M
    parameters (20 MiB in fp32, more than the 16 MiB of slack) with a buffer, after one outer step (the optimizer's
    state exists only then)."""
    import torch

    cfg = make_run_config("sign", {"outer.name": outer, "outer.lr": 1e-3, "outer.params": {}})
    named = [("w", torch.zeros(3 << 20)), ("v", torch.zeros(2 << 20))]
    ref = Reference(cfg, named, buffers=[("bn.running_mean", torch.zeros(1 << 10))], downlink_feedback=True)
    ref.step([torch.full_like(t, 0.01) for t in ref.tensors], 0)
    assert len(ref.to_bytes()) <= ResultLimits.for_model(ref, 4).state
