"""A load generator of lightweight simulated nodes for ``lowband bench scale``: N nodes in P real processes, several
nodes per process (one thread per node while a round runs), each with its own node key, gRPC channel and session
through the real client (node/transport/grpc_client.py: signed calls, heartbeats, resumable Submit), playing
precomputed frames signed by its key (no training).

What a simulated node does not do is hold its round's result: it reads the Collect stream and counts the bytes of
every piece, checking each member's pieces arrive in order and complete (as ``GrpcTransport._assemble`` does), but
keeps none. A real node keeps them, and at 64 relay members of a 10M-parameter sign model that is 80 MB per node per
round; 64 of them in one 24 GiB box would measure this box's memory, not the coordinator. Bytes counted are the
client's: the frame it uploads, and the result payload bytes it receives (relay: the other members' frames;
aggregate: the one reduced frame); gRPC and protobuf framing are not counted, as in ``RoundResult``.

To keep set-up short, each process encodes ``distinct`` random updates (seeded by the process's index) and its
nodes take turns with them; every frame still carries its own sender, round and signature.

The driver (``LoadGenerator``) talks to each process over a pipe, one round at a time: ``prepare`` (pack the
round's frames, untimed), ``go`` (every node submits then collects, timed on the machine-wide monotonic clock),
``stop``. Every wait for a process is bounded; a process that misses its bound is killed and the round fails.
"""
from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Iterator

import grpc

log = logging.getLogger(__name__)
COLLECT_SLACK_S = 30.0  # a Collect's deadline beyond its wait: the download of the result itself


@dataclass(frozen=True)
class NodeSpec:
    """What a load-generator process needs to play its nodes: the coordinator's ``address``, the run file's text,
    the join identity fields every node shares, and its nodes' names."""

    address: str
    run_text: str
    config_json: str
    config_hash: str
    task_fingerprint: str
    model_digest: str
    names: tuple[str, ...]
    seed: int
    distinct: int = 2
    rpc_timeout_s: float = 60.0


@dataclass(frozen=True)
class NodeRound:
    """One simulated node's round: monotonic start (before its Submit) and end (its result counted), bytes up (its
    frame) and down (result payload bytes, cut attempts included), whether the round committed, and why not."""

    name: str
    start: float
    end: float
    bytes_up: int
    bytes_down: int
    committed: bool
    reason: str = ""
    collect_retries: int = 0  # Collect calls cut and asked again


def count_result(stream: Iterator[Any], own: str, counted: list[int]) -> tuple[bool, str]:
    """Read a Collect stream (``CollectChunk`` messages) without keeping it: (committed with ``own``'s frame, why not
    or why it is malformed; "" when whole); ``counted[0]`` grows by every payload byte as it arrives (so a stream cut midway still tells what
    it moved). Relay: every member but ``own`` must arrive complete, each in order; aggregate: the one frame must."""
    header = None
    got: dict[int, int] = {}
    for chunk in stream:
        if chunk.HasField("header"):
            header = chunk.header
            continue
        piece = chunk.piece
        counted[0] += len(piece.data)
        if piece.offset != got.get(piece.member, 0):
            return False, f"pieces of member {piece.member} out of order"
        got[piece.member] = got.get(piece.member, 0) + len(piece.data)
    if header is None:
        return False, "empty result stream"
    if header.committed and own not in header.members:
        return False, "the round committed without this node's frame"
    if header.aggregate_size:
        if got.get(0, 0) != header.aggregate_size:
            return False, f"aggregate incomplete ({got.get(0, 0)}/{header.aggregate_size})"
        return header.committed, ""
    for i, (name, size) in enumerate(zip(header.members, header.payload_sizes)):
        if name != own and got.get(i, 0) != size:
            return False, f"payload of {name} incomplete ({got.get(i, 0)}/{size})"
    return header.committed, ""


class SimulatedNode:
    """One node: a real ``GrpcTransport`` (its own key, channel and session) and its precomputed update."""

    def __init__(self, spec: NodeSpec, name: str, update: dict[str, Any]) -> None:
        from node.transport.grpc_client import GrpcTransport, Identity

        self.name, self.update = name, update
        self.transport = GrpcTransport(spec.address, rpc_timeout_s=spec.rpc_timeout_s)
        self.transport.identity = Identity(name, spec.config_json, spec.config_hash, spec.task_fingerprint,
                                           spec.model_digest, public_key=self.transport.key.public)
        self.frame = b""

    def play(self, round_: int, timeout_s: float) -> NodeRound:
        """Submit this round's frame with the real client, then count the result (see the module doc). A Collect
        cut on the way (CANCELLED, UNAVAILABLE, ...: the coordinator's stream bounds, a busy server) is asked again
        after a backoff, as the real client does, until ``timeout_s``; the bytes of a cut attempt count (they crossed
        the wire) and so do the retries."""
        from node.proto.lowband.v1 import coordinator_pb2 as pb
        from node.transport.grpc_client import RETRYABLE, Backoff, _busy

        t = self.transport
        start = time.monotonic()
        end = start + timeout_s
        outcome = t.submit(round_, self.frame)
        if outcome.startswith("rejected"):
            return NodeRound(self.name, start, time.monotonic(), len(self.frame), 0, False, f"submit: {outcome}")
        # "late": as the real client does, collect anyway; a Submit cut after the coordinator took the frame (seen
        # at N=256: CANCELLED, then the retry finds the round closed) still has the frame in the result
        reason = f"round {round_} did not close within {timeout_s:.0f} s"
        received, retries, backoff = 0, 0, Backoff()
        while time.monotonic() < end:
            wait_ms = int(max(0.1, min(20.0, end - time.monotonic())) * 1000)
            counted = [0]
            try:
                stream = t.stub.Collect(pb.CollectRequest(node_id=t.node_id, round=round_, wait_ms=wait_ms,
                                                          submitted=outcome == "accepted"),
                                        timeout=wait_ms / 1000 + COLLECT_SLACK_S + max(0.0, end - time.monotonic()))
                committed, malformed = count_result(stream, self.name, counted)
                return NodeRound(self.name, start, time.monotonic(), len(self.frame), received + counted[0],
                                 committed and not malformed, malformed, retries)
            except grpc.RpcError as exc:
                received += counted[0]
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the round is still open: ask again
                if exc.code() == grpc.StatusCode.ABORTED:  # our payload is not held (a coordinator restart)
                    outcome = t.submit(round_, self.frame)
                    continue
                if exc.code() in RETRYABLE or _busy(exc):
                    retries += 1
                    reason = f"collect: {exc.code().name}: {exc.details()} ({retries} tries)"
                    backoff.sleep(t.stop)
                    continue
                reason = f"collect: {exc.code().name}: {exc.details()}"
                break
        return NodeRound(self.name, start, time.monotonic(), len(self.frame), received, False, reason, retries)


def _encoded_pool(spec: NodeSpec) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    """(run config, codec, model spec, ``spec.distinct`` encoded random updates of scale 1e-3, seeded by
    ``spec.seed``), for the run's task and codec."""
    import torch

    from node import wire
    from node.compress import make_codec
    from node.runfile import parse_run_file
    from node.tasks import load_task

    cfg = parse_run_file(spec.run_text).run
    task = load_task(cfg.task.name, **cfg.task.params)
    named = [(n, p) for n, p in task.build_model(cfg.seed).named_parameters() if p.requires_grad]
    codec = make_codec(cfg.recipe.codec.name, cfg.recipe.codec.params)
    gen = torch.Generator().manual_seed(1000 + spec.seed)
    pool = [{n: codec.encode(torch.randn(p.shape, generator=gen) * 1e-3) for n, p in named}
            for _ in range(spec.distinct)]
    return cfg, codec, wire.model_spec(named), pool


def worker_main(conn: Connection, spec: NodeSpec) -> None:
    """A load-generator process: join every node, then serve the driver's commands until ``stop`` (module doc)."""
    from node import wire

    logging.basicConfig(level=logging.WARNING)
    nodes: list[SimulatedNode] = []
    try:
        cfg, codec, model_spec, pool = _encoded_pool(spec)
        for i, name in enumerate(spec.names):
            node = SimulatedNode(spec, name, pool[i % len(pool)])
            node.transport.join()
            nodes.append(node)
        conn.send(("ready", len(nodes)))
        while True:
            command, *args = conn.recv()
            if command == "prepare":
                (round_,) = args
                for node in nodes:
                    node.frame = wire.pack(cfg.run_id, round_, node.name, codec, model_spec, node.update,
                                           key=node.transport.key)
                conn.send(("prepared", round_))
            elif command == "go":
                round_, timeout_s = args
                played: list[NodeRound] = []
                barrier = threading.Barrier(len(nodes))

                def play(node: SimulatedNode) -> None:
                    barrier.wait()
                    start = time.monotonic()
                    try:
                        played.append(node.play(round_, timeout_s))
                    except Exception as exc:  # e.g. Rejoin: the round failed for this node, and the row says why
                        played.append(NodeRound(node.name, start, time.monotonic(), len(node.frame), 0, False,
                                                f"{type(exc).__name__}: {exc}"))

                threads = [threading.Thread(target=play, args=(n,), daemon=True) for n in nodes]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(timeout_s + COLLECT_SLACK_S)
                conn.send(("done", round_, played))
            elif command == "stop":
                break
    except Exception as exc:  # the driver reports it; a traceback goes to this process's stderr
        log.exception("load generator %d failed", spec.seed)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        for node in nodes:
            node.transport.leave("bench over")
            node.transport.close()
        conn.close()


class LoadGenerator:
    """Driver side: start ``len(specs)`` processes, wait (≤ ``start_timeout_s``) until every node joined, then
    ``round(r)`` plays one round on every node at once. Use as a context manager: leaving it stops and reaps every
    process (killing one that does not stop within its bound)."""

    def __init__(self, specs: list[NodeSpec], start_timeout_s: float, round_timeout_s: float) -> None:
        self.specs, self.start_timeout_s, self.round_timeout_s = specs, start_timeout_s, round_timeout_s
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[Connection] = []

    def __enter__(self) -> "LoadGenerator":
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds gRPC channels and threads
        for spec in self.specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, spec), name=f"loadgen-{spec.seed}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        try:
            self._gather("ready", self.start_timeout_s)
        except BaseException:
            self.stop(grace_s=0.0)  # no process outlives a failed start (one still joining reads no command)
            raise
        return self

    def _gather(self, expect: str, timeout_s: float) -> list[tuple[Any, ...]]:
        """One answer ``expect`` from every process within ``timeout_s`` in all; raises TimeoutError or
        RuntimeError (a process failed or exited) naming the process."""
        end = time.monotonic() + timeout_s
        answers = []
        for spec, conn in zip(self.specs, self.conns):
            if not conn.poll(max(0.0, end - time.monotonic())):
                raise TimeoutError(f"load generator {spec.seed}: no '{expect}' within {timeout_s:.0f} s")
            try:
                answer = conn.recv()
            except EOFError:
                raise RuntimeError(f"load generator {spec.seed} exited before '{expect}'") from None
            if answer[0] != expect:
                raise RuntimeError(f"load generator {spec.seed}: {answer[0]}: {answer[1:]}")
            answers.append(answer)
        return answers

    def round(self, round_: int) -> list[NodeRound]:
        """Play round ``round_`` on every node: frames packed first (untimed), then every process starts at once."""
        for conn in self.conns:
            conn.send(("prepare", round_))
        self._gather("prepared", self.round_timeout_s)
        for conn in self.conns:
            conn.send(("go", round_, self.round_timeout_s))
        done = self._gather("done", self.round_timeout_s + 2 * COLLECT_SLACK_S)
        return [r for answer in done for r in answer[2]]

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace_s: float = 30.0) -> None:
        """Ask every process to stop (its nodes leave the run), wait ``grace_s`` for each, kill what is left."""
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=grace_s)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self.conns:
            conn.close()


def split_names(names: list[str], procs: int) -> list[tuple[str, ...]]:
    """``names`` dealt round-robin over at most ``procs`` non-empty groups."""
    groups = [tuple(names[i::procs]) for i in range(min(procs, len(names)))]
    return [g for g in groups if g]
