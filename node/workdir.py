"""A node's workdir: its checkpoint and its round log, as the round engine (node/engine.py) writes and reads them.

- ``checkpoint.safetensors``: the state format of docs/state.md with ``kind = "checkpoint"`` (node/train/checkpoint.py),
  written then renamed, on a thread of its own so a large model's snapshot does not stall training.
- ``rounds.jsonl``: one line per applied round, adopted state or resumed checkpoint — the exactly-once audit trail
  (node/roundlog.py).

The node's key (``node.key``, node/identity.py) lives here too; the control plane that signs with it loads it.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from node.fsutil import write_atomic
from node.roundlog import append_line
from node.train import checkpoint, state_file
from node.train.worker import Worker

log = logging.getLogger(__name__)


class Workdir:
    """``path``: the node's directory (created); ``name``: the node's name, for log lines and checkpoint headers;
    ``on_record``: told every entry appended to ``rounds.jsonl`` (the one place a round's record is produced: the
    node's metrics, node/metrics.py)."""

    def __init__(self, path: Path, name: str, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path, self.name, self.on_record = Path(path), name, on_record
        self.path.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._write: Future[None] | None = None

    @property
    def checkpoint_file(self) -> Path:
        return self.path / checkpoint.FILE

    def log_round(self, entry: dict[str, Any]) -> None:
        """Append one line (with the wall time) to ``rounds.jsonl``, then tell ``on_record``."""
        entry = {**entry, "time": time.time()}
        append_line(self.path / "rounds.jsonl", entry)
        if self.on_record is not None:
            self.on_record(entry)

    def checkpoint(self, worker: Worker, config_hash: str, wait: bool = False) -> None:
        """Snapshot ``worker`` now (tensor copies, so training can go on) and write it on the checkpoint thread:
        serialising and fsyncing a large model's state every round would otherwise stall training for seconds.
        One write at a time; write-then-rename keeps the file whole whenever the process dies. Raises ValueError
        for state the format cannot hold (e.g. a user's optimizer state that is not tensors), before writing."""
        if self._write is not None:
            self._write.result()  # the previous round's write is done before the next starts
        header, tensors = checkpoint.snapshot(worker, node=self.name, config_hash=config_hash)
        blob_path = self.checkpoint_file

        def write() -> None:
            write_atomic(blob_path, state_file.dumps(tensors, header))

        self._write = self._executor.submit(write)
        if wait:
            self._write.result()

    def restore(self, worker: Worker, config_hash: str) -> bool:
        """Restore ``worker`` from the checkpoint; False (logged) when there is none, it is of another run, or it is
        not a lowband checkpoint this model can take — the worker is then unchanged."""
        if (self.path / checkpoint.OLD_FILE).exists():
            log.warning("[node=%s] %s is a PyTorch pickle from an older lowband: it is never loaded (delete it); "
                        "checkpoints are %s now", self.name, self.path / checkpoint.OLD_FILE, checkpoint.FILE)
        if self._write is not None:
            self._write.result()  # a rejoin restores what the last write holds, not the file before it
        path = self.checkpoint_file
        if not path.exists():
            return False
        try:
            sf = state_file.parse(path.read_bytes(), worker.reference.max_header() * 3)
            # a checkpoint written before protocol 3 names the same run by its older hash
            legacy = worker.cfg.legacy_config_hash(worker.task.fingerprint)
            if sf.header.get("config_hash") not in (config_hash, legacy):
                log.info("checkpoint is from another run (config hash %s ≠ %s): not used", sf.header.get("config_hash"),
                         config_hash)
                return False
            checkpoint.restore(worker, sf)
        except (OSError, ValueError) as exc:  # StateFormatError is a ValueError
            log.warning("[node=%s] checkpoint %s refused: %s", self.name, path, exc)
            return False
        return True

    def close(self) -> None:
        """Wait for the last write, then stop the checkpoint thread."""
        self._executor.shutdown(wait=True)
