"""Restart: the newest complete snapshot, then the rounds the write-ahead log holds after it, replayed.

The reduce and the outer step are deterministic (the same code on the same frames in the same order: what every
member runs, node/train/reference.py), so replaying a logged round gives the state bit for bit. After the replay
the state's fingerprint must equal the one the last round's row recorded; if it does not (a damaged record, a
snapshot of another state, another version's arithmetic), the coordinator refuses to serve with a ``ReplayError``
that says where it stopped, rather than hand members a state they did not compute. A row whose fingerprint was not
recorded yet (a crash between the commit point and the fingerprint's write) gets the replayed one.
"""
from __future__ import annotations

import json
import logging
import mmap
from pathlib import Path
from typing import Any

from coordinator.commit import apply_prepared, prepare_round
from coordinator.store import Store, WalError
from node.config import run_config_from_dict
from node.errors import ConfigError, PayloadError
from node.keyring import KeyRing
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train.reference import Reference
from node.train.state_file import META_KEY, StateFormatError

log = logging.getLogger(__name__)


class ReplayError(ConfigError):
    """The state dir's snapshot and write-ahead log do not rebuild the state its last round recorded."""


def load_snapshot(reference: Reference, path: Path) -> None:
    """Load a snapshot (or a state file of the format before the write-ahead log) into ``reference``, read through
    a memory map rather than into one bytes object. Raises StateFormatError."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            reference.load_bytes(view)  # type: ignore[arg-type]  # parse takes any buffer
        finally:
            view.release()


def restore(reference: Reference, store: Store, default_applied: dict[str, Any]) -> int:
    """Bring the freshly built (seeded) ``reference`` to the state after the store's last committed round; returns
    the rounds replayed. ``default_applied``: how rounds were applied where a record does not say (a result file
    written before the write-ahead log: the run file's mode). Raises ReplayError."""
    cut = store.cut_tail()
    if cut:
        log.warning("cut write-ahead records of rounds %s: written before a crash, never committed", cut)
    replayed = replay(reference, store, default_applied)
    store.flush()  # the fingerprints the replay filled in
    return replayed


def replay(reference: Reference, store: Store, default_applied: dict[str, Any]) -> int:
    """``restore`` without writing to the state dir (``lowband export`` reads one a coordinator may be using)."""
    last = store.last_round()
    if last is None:
        return 0
    committed, path = store.latest_snapshot()
    if path is not None:
        try:
            load_snapshot(reference, path)
        except (OSError, StateFormatError) as exc:
            raise ReplayError(f"snapshot {path} cannot be loaded: {exc}; move it away to replay from an older one "
                              "(or from the seed, if the write-ahead log goes back that far)") from None
        if reference.committed_rounds != committed:
            raise ReplayError(f"snapshot {path.name} holds {reference.committed_rounds} committed rounds")
    fingerprints = store.fingerprints(committed)
    if committed == last + 1 and fingerprints.get(last) and reference.fingerprint() != fingerprints[last]:
        raise ReplayError(f"snapshot {path} has fingerprint {reference.fingerprint()}, but round {last}'s row recorded "
                          f"{fingerprints[last]}: not serving a state that was not committed")
    # the fingerprint to check: the last round's, or the round before it when the crash came before it was written
    check = last if fingerprints.get(last) else last - 1
    for r in range(committed, last + 1):
        try:
            rec = store.record(r)
        except WalError as exc:
            raise ReplayError(f"cannot replay round {r}: {exc}") from None
        if rec is None:
            raise ReplayError(f"cannot replay round {r}: its write-ahead record {store.dir}/result-{r:08d}.msgpack is "
                              f"missing (the newest snapshot holds {committed} committed rounds)")
        keys = KeyRing.of(rec["keys"]) if rec["keys"] else None
        try:
            prepared = prepare_round(reference, rec["frames"], r, rec["applied"] or default_applied, keys)
        except PayloadError as exc:
            raise ReplayError(f"cannot replay round {r}: {exc}") from None
        apply_prepared(reference, prepared)
        del prepared
        if r >= check:
            fp = reference.fingerprint()
            want = fingerprints.get(r, "")
            if want and fp != want:
                raise ReplayError(f"replaying round {r} gave fingerprint {fp}, but its row recorded {want}: the state "
                                  f"dir's snapshot or write-ahead log is not what was committed; not serving")
            if not want:
                store.pending_fingerprints[r] = fp
    replayed = last + 1 - committed
    log.info("restored %d committed rounds: %s, then %d round(s) replayed from the write-ahead log", last + 1,
             path.name if path is not None else "the seeded model", replayed)
    return replayed


def state_bytes(store: Store) -> tuple[int, bytes | None]:
    """(committed rounds, the state after the store's last committed round as a state file) — for ``lowband
    export``: the newest snapshot, with the logged rounds after it replayed on the model its header describes.
    (0, None) for a run without a committed round. Raises ReplayError, StateFormatError."""
    last = store.last_round()
    if last is None:
        return 0, None
    committed, path = store.latest_snapshot()
    if path is None:
        raise ReplayError(f"{store.dir} holds no snapshot yet (the first is written after "
                          "rounds.snapshot_every rounds, and when the run completes): export it later")
    if committed == last + 1:
        return committed, path.read_bytes()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(json.loads(f.read(min(n, 64 << 20)))["__metadata__"][META_KEY])
    cfg = run_config_from_dict(header["run"])
    task = load_task(cfg.task.name, **cfg.task.params)
    # a compressed-downlink run's snapshot carries the residual its logged rounds advance (node/train/downlink.py)
    reference = Reference.for_model(cfg, build_seeded(task, cfg.seed), downlink_feedback="downlink" in header)
    replay(reference, store, {"result": "relay"})
    return reference.committed_rounds, reference.to_bytes()
