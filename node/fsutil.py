"""Crash-safe file writes: a reader sees the old file or the new one, never a torn mix."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable


def write_atomic(path: str | Path, data: bytes | bytearray | memoryview | str | Iterable[bytes], durable: bool = True,
                 unique_tmp: bool = False) -> None:
    """Write to a temporary sibling, fsync (``durable``), then rename over ``path`` and fsync the folder. ``data``:
    the contents, or an iterable of pieces written one after another (a large file is then never whole in memory).

    The temporary file is ``NAME.tmp`` by default: a single writer that crashes mid-write leaves one such file,
    which its next write replaces (a checkpoint is large; crashes must not pile up copies of it). Paths that
    several processes may write at once (a shared cache) need ``unique_tmp``: each writer gets its own
    ``NAME.XXXX.tmp``, so two writers never write into one file. A write that fails removes its temporary file.
    """
    path = Path(path)
    pieces: Iterable[bytes | bytearray | memoryview] = (
        (data.encode(),) if isinstance(data, str) else (data,) if isinstance(data, (bytes, bytearray, memoryview))
        else data)
    if unique_tmp:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        tmp = Path(name)
        f = os.fdopen(fd, "wb")
    else:
        tmp = path.with_name(path.name + ".tmp")
        f = open(tmp, "wb")
    try:
        with f:
            for piece in pieces:
                f.write(piece)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
