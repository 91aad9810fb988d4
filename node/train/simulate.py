"""In-process simulator: N workers, one process, the same Worker and transport seam as real nodes.

Workers run their inner loops one after another (a 2-core box gains nothing from threads), submit
through an ``InProcessHub``, then each collects and applies the round. Bytes are exactly what a relay
all-gather moves: each worker sends its frame once and receives every other member's frame. Every worker has a key
of its own and signs its frames; every worker verifies every frame (``signed=False``: unsigned frames, nothing
verified). With a recipe's ``reduce`` on, each round's record carries the accountability report (``robust``).

``result`` plays a coordinator's ``[rounds] result`` (node/runfile.py): ``relay`` as above; ``aggregate`` and
``compressed`` reduce the round once, in a coordinator's reference (``CoordinatorResult``), and hand every worker that
one frame (dense, or in the run's codec with the downlink's error feedback, node/train/downlink.py), so the bytes
received are one frame per worker per round and the quality is what a coordinator run in that mode gets.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from node.config import RunConfig
from node.identity import NodeKey
from node.keyring import KeyRing
from node.tasks import Task, load_task
from node.train.reference import Reference
from node.train.worker import Transform, Worker
from node.transport.messages import RoundResult, RoundStatus
from node.transport.inprocess import InProcessHub

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    round: int
    members: int
    train_loss: float
    inner_lr: float
    bytes_sent_per_worker: int  # cumulative
    bytes_received_per_worker: int  # cumulative
    tokens_per_worker: int  # cumulative
    val_loss: float | None = None
    replicas_identical: bool | None = None
    robust: dict[str, Any] | None = None  # the round's accountability report (RoundReport.to_json), reduce on


@dataclass
class SimResult:
    recipe: str
    workers: int
    H: int
    rounds: int
    tokens_per_worker: int
    final_val_loss: float
    bytes_sent_per_worker: int
    bytes_received_per_worker: int
    payload_bytes_per_round: int
    params: int
    wall_s: float
    config_hash: str
    task_fingerprint: str
    history: list[RoundRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RESULT_MODES = ("relay", "aggregate", "compressed")


class CoordinatorResult:
    """A coordinator's side of ``result = "aggregate"`` or ``"compressed"``, in process: its own reference (the
    workers' initial one, copied), which reduces each relayed round, encodes the aggregate, steps, and returns the one
    frame every member gets (``Reference.apply_aggregate``, as coordinator/commit.py does)."""

    def __init__(self, start: Reference, result: str, aggregate_codec: str = "identity") -> None:
        if result not in RESULT_MODES[1:]:
            raise ValueError(f"result must be 'aggregate' or 'compressed', got {result!r}")
        self.dense_codec = None if result == "compressed" else aggregate_codec
        self.reference = Reference(start.cfg, list(zip(start.names, start.tensors)), start.device,
                                   list(zip(start.buffer_names, start.buffers)),
                                   downlink_feedback=result == "compressed")
        self.codec_name = start.codec.name if self.dense_codec is None else self.dense_codec

    def commit(self, relayed: RoundResult) -> RoundResult:
        """The aggregate result of a committed relayed round (its payloads and keys), without per-worker bytes."""
        envelopes, rejected = self.reference.unpack(relayed.payloads, relayed.round, KeyRing.of(relayed.member_keys))
        for sender, why in rejected.items():
            log.warning("[round=%d] coordinator rejected the payload of %s: %s", relayed.round, sender, why)
        if not envelopes:
            return RoundResult(relayed.round, RoundStatus.NO_QUORUM, reason="no valid payload")
        frame = self.reference.apply_aggregate(envelopes, relayed.round, self.dense_codec)
        return RoundResult(relayed.round, RoundStatus.COMMITTED, reason=relayed.reason,
                           reference_fingerprint=self.reference.fingerprint(), aggregate=frame,
                           aggregate_codec=self.codec_name, aggregate_members=tuple(e.sender for e in envelopes))


def build_task(cfg: RunConfig) -> Task:
    return load_task(cfg.task.name, **cfg.task.params)


def evaluate(workers: list[Worker], task: Task) -> tuple[float, bool]:
    """Mean validation loss over distinct replicas, and whether all replicas are bit-identical."""
    prints = [w.fingerprint() for w in workers]
    seen: dict[str, float] = {}
    for w, fp in zip(workers, prints):
        if fp not in seen:
            with w.reference_weights() as model:  # θ_ref: with overlap the local weights run one round ahead
                seen[fp] = task.evaluate(model)
    return sum(seen.values()) / len(seen), len(seen) == 1


def simulate(cfg: RunConfig, task: Task | None = None, device: str = "cpu", eval_every: int = 0,
             on_round: Callable[[RoundRecord], None] | None = None, *, signed: bool = True,
             transforms: Mapping[str, Transform] | None = None,
             on_workers: Callable[[list[Worker]], None] | None = None, result: str = "relay",
             aggregate_codec: str = "identity") -> SimResult:
    """Run ``cfg.rounds`` rounds with ``cfg.workers`` workers (named ``w0`` … ``w{n-1}``, trained and prepared in that
    order every round); evaluate every ``eval_every`` rounds and at the end. ``transforms``: worker name → what it does
    to its pseudo-gradient before encoding (``Worker.prepare``; the Byzantine benchmark's attackers, which it puts
    last so they see the others' updates of the round); ``on_workers``: called once with the workers, built.
    ``result``: relay, aggregate (dense, ``aggregate_codec``) or compressed (module doc); raises ValueError for another.
    """
    if result not in RESULT_MODES:
        raise ValueError(f"result must be one of {', '.join(RESULT_MODES)}, got {result!r}")
    start = time.perf_counter()
    task = task or build_task(cfg)
    n = cfg.workers
    workers = [Worker(f"w{i}", cfg, task, shard=i, num_shards=n, device=device,
                      key=NodeKey.generate() if signed else None) for i in range(n)]
    coordinator = CoordinatorResult(workers[0].reference, result, aggregate_codec) if result != "relay" else None
    if on_workers is not None:
        on_workers(workers)
    hub = InProcessHub(min_members=1)
    links = [hub.connect(w.name, w.key.public if w.key is not None else b"") for w in workers]
    transforms = transforms or {}
    sent = received = tokens = 0
    history: list[RoundRecord] = []
    val = float("nan")
    held: dict[str, RoundResult] = {}  # overlap: each worker's result of the previous round, applied late
    for r in range(cfg.rounds):
        losses, lrs = [], []
        for w, link in zip(workers, links):
            stats = w.train()
            losses.append(stats.mean_loss)
            lrs.append(stats.last_lr)
            if w.name in held:
                w.apply(held.pop(w.name))
            link.submit(r, w.prepare(r, transform=transforms.get(w.name)))
        round_sent = round_received = 0
        members = 0
        aggregated: RoundResult | None = None
        for w, link in zip(workers, links):
            got = link.collect(r)
            if coordinator is not None and got.committed:  # one frame down to each worker instead of the others'
                aggregated = aggregated or coordinator.commit(got)
                got = dataclasses.replace(aggregated, bytes_sent=got.bytes_sent,
                                          bytes_received=len(aggregated.aggregate or b""))
            members = len(got.members)
            if cfg.recipe.overlap:
                held[w.name] = got
            else:
                w.apply(got)
            round_sent += got.bytes_sent
            round_received += got.bytes_received
        if r == cfg.rounds - 1:
            for w in workers:  # the last round lands after training ended
                if w.name in held:
                    w.apply(held.pop(w.name))
        sent += round_sent // n
        received += round_received // n
        tokens += cfg.recipe.H * task.tokens_per_batch
        rec = RoundRecord(r, members, sum(losses) / n, lrs[0], sent, received, tokens)
        report = workers[0].reference.last_report
        rec.robust = report.to_json() if report is not None and report.round == r else None
        last = r == cfg.rounds - 1
        if last or (eval_every and (r + 1) % eval_every == 0):
            val, identical = evaluate(workers, task)
            rec.val_loss, rec.replicas_identical = val, identical
        history.append(rec)
        log.info("[recipe=%s round=%d] members=%d loss=%.4f%s lr=%.2e sent=%d recv=%d", cfg.recipe.name, r, members,
                 rec.train_loss, f" val={rec.val_loss:.4f}" if rec.val_loss is not None else "", rec.inner_lr,
                 sent, received)
        if on_round is not None:
            on_round(rec)
    w0 = workers[0]
    return SimResult(recipe=cfg.recipe.name, workers=n, H=cfg.recipe.H, rounds=cfg.rounds, tokens_per_worker=tokens,
                     final_val_loss=val, bytes_sent_per_worker=sent, bytes_received_per_worker=received,
                     payload_bytes_per_round=w0.payload_bytes(), params=sum(p.numel() for p in w0.params),
                     wall_s=time.perf_counter() - start, config_hash=cfg.config_hash(task.fingerprint),
                     task_fingerprint=task.fingerprint, history=history)
