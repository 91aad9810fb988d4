"""Resumable chunked uploads: reassemble one node's payload for a round from client-stream chunks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import BadPayload, ResumeMismatch, TooLarge

MAX_CHUNK = 4 << 20
RESUME_KEY = "lowband-resume-offset"


@dataclass
class Upload:
    node_id: str
    round: int
    total: int
    data: bytearray = field(default_factory=bytearray)
    loss: float = float("nan")
    duplicate_of: Any = None  # the payload already accepted (bytes, or a wal_stream.HeldFrame), when this repeats it

    @property
    def received(self) -> int:
        return len(self.data)

    @property
    def complete(self) -> bool:
        return self.received == self.total


def check_first_chunk(total: int, limit: int) -> None:
    if total == 0:
        raise BadPayload("total_size is 0: an upload must carry a payload")
    if total > limit:
        raise TooLarge(f"payload of {total} bytes exceeds this run's limit of {limit} bytes")


def append_chunk(up: Upload, node_id: str, round_: int, offset: int, total: int, data: bytes) -> None:
    """Append one chunk, checking it belongs to this upload and continues it exactly."""
    if node_id != up.node_id or round_ != up.round or total != up.total:
        raise BadPayload(f"chunk for node/round/total ({round_}, {total}) differs from the upload's first chunk "
                         f"({up.round}, {up.total})")
    if offset != up.received:
        raise ResumeMismatch(f"chunk offset {offset} but {up.received} bytes are held; resume from {up.received}",
                             {RESUME_KEY: str(up.received)})
    if len(data) > MAX_CHUNK:
        raise TooLarge(f"chunk of {len(data)} bytes exceeds the {MAX_CHUNK}-byte chunk limit")
    if up.received + len(data) > up.total:
        raise BadPayload(f"chunks carry more than the declared total_size {up.total}")
    up.data += data
