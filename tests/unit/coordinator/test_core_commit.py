"""The idempotent commit with a fake clock and a failing ``Disk`` (the store's seam): a round whose commit cannot be
persisted is never applied — however often tick() retries it — and is applied exactly once when the disk is back;
the store's audit trail survives a torn line. Harness: core_harness.py; fixtures: conftest.py."""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, Callable

import pytest

from core_harness import Clock, Harness
from coordinator.errors import Unavailable
from coordinator.store import Disk
from node.roundlog import coordinator_rounds


class FullDisk(Disk):
    def __init__(self) -> None:
        self.full = False
        self.refused = 0

    def _check(self) -> None:
        if self.full:
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_atomic(self, path: Path, data: bytes) -> None:
        self._check()
        super().write_atomic(path, data)

    def transaction(self, db: Any, statements: Callable[[], None]) -> None:
        self._check()
        super().transaction(db, statements)

    def append_line(self, path: Path, line: str) -> None:
        self._check()
        super().append_line(path, line)


def test_a_commit_that_cannot_be_persisted_is_never_applied_and_then_applied_once(tmp_path: Path,
                                                                                 clock: Clock) -> None:
    disk = FullDisk()
    h = Harness(tmp_path / "state", clock, disk=disk)
    try:
        ja, jb = h.join("a"), h.join("b")
        workers = {"a": h.worker("a", ja), "b": h.worker("b", jb)}
        frames = {}
        for name, w in workers.items():
            w.train()
            frames[name] = w.prepare(0)
        before = h.core.reference.fingerprint()
        disk.full = True
        h.submit("a", 0, frames["a"])
        h.submit("b", 0, frames["b"])  # the round closes; persisting it fails
        for _ in range(50):  # every tick retries, paced by the clock
            clock.advance(1.0)
            h.core.heartbeat(h.ids["a"]), h.core.heartbeat(h.ids["b"])
            h.core.tick()
        assert disk.refused >= 5  # retried with a backoff (0.5 s doubling to 10 s)
        assert h.core.reference.fingerprint() == before and h.core.reference.committed_rounds == 0
        assert h.core.open_round == 0 and not h.core.persistence.ok
        assert "cannot persist round 0: OSError: [Errno 28] No space left on device" in h.core.status()["persistence_error"]
        with pytest.raises(Unavailable, match="not serving rounds: cannot persist round 0"):
            h.core.collect(h.ids["a"], 0, 0.0, True)
        disk.full = False
        clock.advance(10.0)
        h.core.heartbeat(h.ids["a"]), h.core.heartbeat(h.ids["b"])
        h.core.tick()
        assert h.core.persistence.ok and h.core.open_round == 1
        result, _ = h.core.collect(h.ids["a"], 0, 0.0, True)
        for w in workers.values():  # each replica applies round 0 once: the coordinator did too
            from node.transport.messages import RoundResult, RoundStatus

            w.apply(RoundResult(0, RoundStatus.COMMITTED, dict(result.frames)))
            assert w.fingerprint() == h.core.reference.fingerprint() == result.fingerprint
        assert [r.round for r in coordinator_rounds(h.store.dir)] == [0]
    finally:
        h.close()


def test_members_that_cannot_be_saved_stop_rounds_until_they_can(tmp_path: Path, clock: Clock) -> None:
    disk = FullDisk()
    h = Harness(tmp_path / "state", clock, disk=disk)
    try:
        h.join("a")
        disk.full = True
        h.join("b")  # admitted in memory; saving the members failed
        assert not h.core.persistence.ok and h.core.members_dirty
        with pytest.raises(Unavailable, match="cannot persist the members"):
            h.submit("a", 0)
        disk.full = False
        clock.advance(1.0)
        h.core.tick()
        assert h.core.persistence.ok and {m.name for m in h.store.load_members(0.0).values()} == {"a", "b"}
        h.submit("a", 0), h.submit("b", 0)
        assert h.core.open_round == 1
    finally:
        h.close()


def test_the_audit_trail_drops_a_torn_last_line_before_appending(tmp_path: Path) -> None:
    log = tmp_path / "rounds.jsonl"
    log.write_text('{"round": 0}\n{"round": 1, "comm')  # a crash or a full disk mid-line
    Disk().append_line(log, '{"round": 1}')
    assert log.read_text() == '{"round": 0}\n{"round": 1}\n'
    log.write_text('{"tor')
    Disk().append_line(log, '{"round": 2}')
    assert log.read_text() == '{"round": 2}\n'


@pytest.mark.parametrize("recipe", ["ddp", "diloco", "dsm", "sign", "dct-consistent", "demo"])
def test_prepare_changes_nothing_and_the_in_place_step_equals_apply(recipe: str) -> None:
    """The commit reduces a round without touching the live reference, then steps in place (coordinator/commit.py):
    two rounds prepared and applied land exactly where ``Reference.apply`` does — also where the step reduces tensor
    by tensor (``Reference.step_each``) — and preparing alone changes nothing."""
    import torch

    from coordinator.commit import apply_prepared, prepare_round
    from node.recipes import make_run_config
    from node.config import TaskConfig
    from node.tasks import load_task
    from node.tasks.base import build_seeded
    from node.train.reference import Reference
    from node import wire

    cfg = make_run_config(recipe, {}, task=TaskConfig("gpt", {"size": "tiny", "batch_size": 2, "block_size": 32}),
                          workers=1, rounds=10)
    task = load_task(cfg.task.name, **cfg.task.params)
    model = build_seeded(task, cfg.seed)
    oracle, live = (Reference.for_model(cfg, model) for _ in range(2))
    gen = torch.Generator().manual_seed(7)
    for r in range(2):
        enc = {s.name: oracle.codec.encode(torch.randn(s.shape, generator=gen) * 1e-2) for s in oracle.spec}
        frames = {"a": wire.pack(cfg.run_id, r, "a", oracle.codec, oracle.spec, enc)}
        oracle.apply(oracle.unpack(frames, r)[0], r)
        before = live.fingerprint()
        prepared = prepare_round(live, frames, r, {"result": "relay"})
        assert live.fingerprint() == before and live.committed_rounds == r  # untouched until the commit point
        # an outer step of each parameter alone (no clip norm): reduced tensor by tensor inside the step
        assert (prepared.envelopes is not None) == live.steps_tensor_by_tensor
        assert live.steps_tensor_by_tensor == (recipe in ("diloco", "dsm", "sign", "dct-consistent", "demo"))
        apply_prepared(live, prepared)
        assert live.fingerprint() == oracle.fingerprint() and live.committed_rounds == r + 1
    assert live.to_bytes() == oracle.to_bytes()  # the outer optimizer's state too
