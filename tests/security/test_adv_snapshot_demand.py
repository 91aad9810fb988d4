"""Adversarial review (adv-today) of ``FetchStateRequest.min_committed_rounds`` (coordinator/core.py ``fetch_state``,
coordinator/snapshot.py ``Snapshotter.for_joiner``) against a member that controls its own requests. The coordinator
core is driven directly (tests/unit/coordinator/core_harness.py): real frames, a real store on disk.

- ``test_one_member_cannot_force_a_snapshot_every_round`` — the finding, fixed: a member (or anyone holding the
  join token, before Join) that asked for ``min_committed_rounds`` = 2**64 - 1 after every round made the coordinator
  write a snapshot of its whole state (θ_ref, the outer optimizer's buffers, the downlink residual), fsync it and
  read it back to hash it, every round — whatever ``rounds.snapshot_every`` the operator chose so that a snapshot
  ends between rounds. Before the field, a joiner could force one only when the newest snapshot was more than
  ``keep_results`` rounds old: at most one per ``keep_results`` rounds. Now a snapshot taken for ``at_least`` alone
  is also taken at most once per ``keep_results`` rounds (the member then replays up to its own round from the
  results): at most two per ``keep_results`` rounds in all, whoever asks.
- ``test_a_state_taken_on_demand_matches_its_fingerprint`` — what held: the snapshot a huge ``min_committed_rounds``
  forces is of the committed rounds at that moment and loads to the fingerprint it is served with; so after a
  restart (``test_after_a_restart_...``); before any round every value gets the seeded state.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "coordinator"))

from core_harness import Clock, Harness  # noqa: E402
from coordinator.store import Disk  # noqa: E402
from node.train.reference import Reference  # noqa: E402

HUGE = 2**64 - 1  # the largest uint64 a FetchStateRequest carries
ROUNDS = 6
KEEP = 8  # rounds.keep_results' default


class CountingDisk(Disk):
    """Counts the snapshots the store published (renamed into place)."""

    def __init__(self) -> None:
        self.published = 0

    def publish(self, f: IO[bytes], path: Path) -> None:
        super().publish(f, path)
        self.published += 1


def _run(tmp_path: Path) -> tuple[Harness, CountingDisk, dict[str, Any]]:
    disk = CountingDisk()
    h = Harness(tmp_path / "state", Clock(), {"rounds": {"snapshot_every": 100, "keep_results": KEEP}}, disk=disk)
    workers = {n: h.worker(n, h.join(n)) for n in ("a", "b")}
    return h, disk, workers


def _round(h: Harness, workers: dict[str, Any], r: int) -> None:
    for name, w in workers.items():
        w.train()
        h.submit(name, r, w.prepare(r))


def test_one_member_cannot_force_a_snapshot_every_round(tmp_path: Path) -> None:
    h, disk, workers = _run(tmp_path)
    try:
        for r in range(ROUNDS):
            _round(h, workers, r)
            for _ in h.core.fetch_state(h.ids["b"], 0, min_committed=HUGE):  # "b" asks for the newest, every round
                pass
            h.core.snapshots.wait()
        # what a joiner could force before — one when the newest snapshot (the seeded model's) is too old to serve —
        # and at most one more for min_committed_rounds per keep_results rounds
        assert disk.published <= 2 * (1 + ROUNDS // KEEP), f"{disk.published} full snapshots in {ROUNDS} rounds"
    finally:
        h.close()


def test_a_state_taken_on_demand_matches_its_fingerprint(tmp_path: Path) -> None:
    h, _, workers = _run(tmp_path)
    try:
        for r in range(3):
            _round(h, workers, r)
        parts = list(h.core.fetch_state(h.ids["b"], 0, min_committed=HUGE))
        assert {p["committed_rounds"] for p in parts} == {3}
        fresh = Reference.for_model(h.cfg.run, h.core.task.build_model(h.cfg.run.seed))
        fresh.load_bytes(b"".join(p["data"] for p in parts))
        assert fresh.committed_rounds == 3
        assert fresh.fingerprint() == parts[0]["reference_fingerprint"] == h.core.reference.fingerprint()
    finally:
        h.close()


@pytest.mark.parametrize("asked", [0, 1, HUGE])
def test_min_committed_rounds_before_any_round_serves_the_seeded_state(tmp_path: Path, asked: int) -> None:
    """What held: before any round committed every value (0, 1, the largest) gets the seeded state of 0 rounds."""
    h, _, _ = _run(tmp_path)
    try:
        parts = list(h.core.fetch_state(h.ids["a"], 0, min_committed=asked))
        assert {p["committed_rounds"] for p in parts} == {0}
    finally:
        h.close()


def test_after_a_restart_the_newest_state_is_served_and_matches_its_fingerprint(tmp_path: Path) -> None:
    """What held: a coordinator restarted over its state dir (the rounds after its newest snapshot replayed from the
    write-ahead log) serves a huge ``min_committed_rounds`` the state of every committed round, under its fingerprint."""
    h, _, workers = _run(tmp_path)
    for r in range(3):
        _round(h, workers, r)
    ids, keys = dict(h.ids), h.keys
    h.close()
    h = Harness(tmp_path / "state", Clock(), {"rounds": {"snapshot_every": 100, "keep_results": KEEP}})
    h.ids, h.keys = ids, keys
    try:
        h.join("b")
        parts = list(h.core.fetch_state(h.ids["b"], 0, min_committed=HUGE))
        assert {p["committed_rounds"] for p in parts} == {3}
        fresh = Reference.for_model(h.cfg.run, h.core.task.build_model(h.cfg.run.seed))
        fresh.load_bytes(b"".join(p["data"] for p in parts))
        assert fresh.fingerprint() == parts[0]["reference_fingerprint"] == h.core.reference.fingerprint()
    finally:
        h.close()
