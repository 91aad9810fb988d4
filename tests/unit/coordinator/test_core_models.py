"""CoordinatorCore with real models (issue 15): a BatchNorm model's buffers in the coordinator's reference, its
persisted state and its evaluator's loss; and a round that cannot reach min_nodes because a member only observes
closes at the deadline instead of waiting forever. Harness: core_harness.py; fixtures: conftest.py."""
from __future__ import annotations

from typing import Callable

import pytest

import core_harness
from core_harness import Clock, Harness
from coordinator.errors import StillOpen
from node.train.reference import Reference
from node.transport.messages import RoundResult, RoundStatus

SHAPES = {"run": {"task": "node.tasks.examples.shapes:shapes_task", "recipe": "diloco"},
          "task": {"batch_size": 8, "channels": 4, "size": 8}, "recipe": {"H": 2},
          "membership": {"min_nodes": 2}, "rounds": {"eval_every": 1}}


def test_the_coordinator_reference_and_its_evaluation_use_the_members_buffers(
        make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(core_harness.BASE, "task", {})  # the gpt parameters of the other core tests are not ours
    h = make({k: dict(v) for k, v in SHAPES.items()}, state="shapes")
    joins = {n: h.join(n) for n in ("a", "b")}
    workers = {n: h.worker(n, j) for n, j in joins.items()}
    assert h.core.reference.buffer_names[:2] == ["bn1.running_mean", "bn1.running_var"]
    for r in range(2):
        for n, w in workers.items():
            w.train()
            h.submit(n, r, w.prepare(r))
        result, _ = h.core.collect(h.ids["a"], r, 0.0, submitted=True)
        frames = result.frames
        for w in workers.values():
            w.apply(RoundResult(r, RoundStatus.COMMITTED, frames, reference_fingerprint=h.core.reference.fingerprint()))
    a = workers["a"]
    assert a.fingerprint() == workers["b"].fingerprint() == h.core.reference.fingerprint()
    assert all(x.equal(y) for x, y in zip(a.reference.buffers, h.core.reference.buffers))
    # the state joiners download (a snapshot file) carries them: a fresh replica loaded from it matches
    _, blob, _ = h.core.state_blob()
    fresh = Reference.for_model(h.cfg.run, h.core.task.build_model(h.cfg.run.seed))
    fresh.load_bytes(blob)
    assert fresh.fingerprint() == h.core.reference.fingerprint()
    # and the evaluator scored the reference with the agreed statistics: the loss every member computes
    h.core.evaluator.stop()
    with a.reference_weights() as model:
        want = h.core.task.evaluate(model)
    assert h.core.recent[-1].round == 1 and h.core.recent[-1].val_loss == want


def test_a_round_short_of_min_nodes_closes_when_the_missing_member_only_observes(
        make: Callable[..., Harness], clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    h = make({"membership": {"min_nodes": 3, "max_nodes": 3}})
    for n in ("a", "b", "c"):
        h.join(n)
    h.submit("a", 0)
    h.submit("c", 0)
    with pytest.raises(StillOpen):  # b's frame was refused: it takes the round's result without a payload
        h.core.collect(h.ids["b"], 0, 0.0, submitted=False)
    clock.advance(4.9)
    h.core.tick()
    assert h.core.open_round == 0  # the deadline (5 s after the first payload) still applies
    clock.advance(0.2)
    h.core.tick()
    assert h.core.open_round == 1
    row = h.core.recent[-1]
    assert row.members == ["a", "c"] and row.close == "quorum_unreachable"
    assert "no more payloads can come" in caplog.text


def test_without_an_observer_a_short_round_still_waits_for_its_quorum(make: Callable[..., Harness],
                                                                      clock: Clock) -> None:
    h = make({"membership": {"min_nodes": 3, "max_nodes": 3}})
    for n in ("a", "b", "c"):
        h.join(n)
    h.submit("a", 0)
    h.submit("c", 0)
    clock.advance(60.0)  # b is silent but may still send: min_nodes holds
    h.core.tick()
    assert h.core.open_round == 0


