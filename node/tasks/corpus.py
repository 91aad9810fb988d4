"""A byte-level text corpus that needs no download: the running interpreter's standard library sources.

Every node of a run must train on the same bytes without fetching anything, and the stdlib is the one
sizeable text that every Python install carries. Different Python versions ship different sources, so
the corpus carries a content fingerprint and runs on mismatched corpora are told apart.

Building means reading ~1,800 files and hashing them; the result is cached on disk under a key made of
(path, size, mtime) so that later processes load two flat files with ``np.fromfile`` instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from node.fsutil import write_atomic

log = logging.getLogger(__name__)

#: bump when the layout of the built corpus changes, so old cache entries are never reused
FORMAT_VERSION = 1
SEPARATOR = b"\0"
# Third-party packages vary between machines with the same Python; __pycache__ holds no sources and is
# pruned only to save the walk.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """Train and validation byte streams plus what identifies them."""

    train: torch.Tensor  # (N_train,) uint8
    val: torch.Tensor  # (N_val,) uint8
    fingerprint: str  # sha256 hex over (val_percent, sorted (relpath, sha256(content)))
    num_files: int


_MEMO: dict[tuple[str, int, str], Corpus] = {}
_MEMO_LOCK = threading.Lock()


def stdlib_root() -> Path:
    """The directory whose sources make the corpus; the interpreter's, so no configuration can drift."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_cache_dir() -> Path:
    """Read at call time so that tests and operators can redirect the cache with ``LOWBAND_CACHE``."""
    env = os.environ.get("LOWBAND_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lowband"


def list_source_files(root: Path) -> list[str]:
    """Relative posix paths of every ``*.py`` under ``root``, sorted, without third-party packages."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                full = Path(dirpath, name)
                if full.is_file():
                    found.append(full.relative_to(root).as_posix())
    found.sort()
    return found


def _path_hash(relpath: str) -> str:
    return hashlib.sha256(relpath.encode("utf-8")).hexdigest()


def is_validation(relpath: str, val_percent: int) -> bool:
    """Split by path, not by position, so that no file contributes to both train and validation."""
    return int(_path_hash(relpath)[:8], 16) % 100 < val_percent


def _check_val_percent(val_percent: int) -> None:
    if isinstance(val_percent, bool) or not isinstance(val_percent, int) or not 0 <= val_percent <= 100:
        raise ValueError(f"val_percent must be an int in [0, 100], got {val_percent!r}")


def _cheap_key(root: Path, relpaths: list[str], val_percent: int) -> str:
    """Identify a cache entry from stat() alone; reading every file would cost what the cache saves."""
    h = hashlib.sha256(f"lowband-corpus-v{FORMAT_VERSION}\n{root}\n{val_percent}\n".encode())
    for rel in relpaths:
        st = os.stat(root / rel)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _bin_paths(cache_dir: Path, fingerprint: str) -> tuple[Path, Path]:
    stem = f"corpus-{fingerprint[:16]}"
    return cache_dir / f"{stem}-train.bin", cache_dir / f"{stem}-val.bin"


def _meta_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"corpus-key-{key[:16]}.json"


def _build(root: Path, relpaths: list[str], val_percent: int) -> tuple[bytearray, bytearray, str]:
    """Read, split, order and join the sources; returns (train, val, fingerprint)."""
    contents = {rel: (root / rel).read_bytes() for rel in relpaths}
    fp = hashlib.sha256(f"lowband-corpus-v{FORMAT_VERSION}\nval_percent={val_percent}\n".encode())
    for rel in relpaths:  # already sorted by relpath
        fp.update(f"{rel}\0{hashlib.sha256(contents[rel]).hexdigest()}\n".encode("utf-8", "surrogateescape"))
    # Order by path hash: a fixed shuffle, so that neighbouring shards do not all get one package.
    ordered = sorted(relpaths, key=_path_hash)
    train = bytearray(SEPARATOR.join(contents[r] for r in ordered if not is_validation(r, val_percent)))
    val = bytearray(SEPARATOR.join(contents[r] for r in ordered if is_validation(r, val_percent)))
    return train, val, fp.hexdigest()


def _load_cached(cache_dir: Path, key: str) -> Corpus | None:
    """The cached corpus for ``key``, or None when absent or damaged (the caller rebuilds)."""
    meta_path = _meta_path(cache_dir, key)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            return None
        train_path, val_path = _bin_paths(cache_dir, meta["fingerprint"])
        if train_path.stat().st_size != meta["train_bytes"] or val_path.stat().st_size != meta["val_bytes"]:
            log.warning("corpus cache %s has the wrong size; rebuilding", train_path.parent)
            return None
        train = np.fromfile(train_path, dtype=np.uint8)
        val = np.fromfile(val_path, dtype=np.uint8)
        return Corpus(torch.from_numpy(train), torch.from_numpy(val), meta["fingerprint"], int(meta["num_files"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # json errors are ValueErrors
        log.warning("corpus cache entry %s unreadable (%s); rebuilding", meta_path, e)
        return None


def _store(cache_dir: Path, key: str, root: Path, train: bytearray, val: bytearray, fp: str, n: int) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    train_path, val_path = _bin_paths(cache_dir, fp)
    # several processes may build the cache at once (a test run, a demo's nodes): each writes its own temp file
    write_atomic(train_path, train, unique_tmp=True)
    write_atomic(val_path, val, unique_tmp=True)
    meta = {
        "format": FORMAT_VERSION, "key": key, "fingerprint": fp, "num_files": n,
        "train_bytes": len(train), "val_bytes": len(val), "stdlib": str(root),
    }
    write_atomic(_meta_path(cache_dir, key), json.dumps(meta, indent=1), unique_tmp=True)  # last: marks completion


def load_stdlib_corpus(val_percent: int = 5, cache_dir: str | os.PathLike[str] | None = None) -> Corpus:
    """The stdlib corpus, from the in-process memo, the disk cache, or built from source, in that order.

    A failure to write the cache (read-only home, full disk) is logged and otherwise ignored: the
    corpus is still correct, only the next process pays the build again.
    """
    _check_val_percent(val_percent)
    root = stdlib_root()
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    memo_key = (str(root), val_percent, str(cdir))
    with _MEMO_LOCK:
        hit = _MEMO.get(memo_key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        relpaths = list_source_files(root)
        if not relpaths:
            raise ValueError(f"no *.py files under the stdlib directory {root}; cannot build the corpus")
        key = _cheap_key(root, relpaths, val_percent)
        corpus = _load_cached(cdir, key)
        if corpus is not None:
            log.info("corpus %s loaded from %s in %.3f s", corpus.fingerprint[:16], cdir, time.perf_counter() - t0)
        else:
            train, val, fp = _build(root, relpaths, val_percent)
            log.info("corpus %s built from %d files (%d train, %d val bytes) in %.3f s",
                     fp[:16], len(relpaths), len(train), len(val), time.perf_counter() - t0)
            try:
                _store(cdir, key, root, train, val, fp, len(relpaths))
            except OSError as e:
                log.warning("could not write corpus cache to %s: %s", cdir, e)
            corpus = Corpus(
                torch.from_numpy(np.frombuffer(train, dtype=np.uint8)),
                torch.from_numpy(np.frombuffer(val, dtype=np.uint8)),
                fp, len(relpaths),
            )
        _MEMO[memo_key] = corpus
        return corpus


def clear_memo() -> None:
    """Forget corpora loaded in this process; for tests that exercise the disk cache."""
    with _MEMO_LOCK:
        _MEMO.clear()


def shard_bounds(length: int, worker: int, num_workers: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of worker ``worker``; shards are disjoint, cover ``[0, length)`` and
    differ in size by at most one, so equal-token accounting stays fair across workers."""
    for field, value in (("length", length), ("worker", worker), ("num_workers", num_workers)):
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise ValueError(f"{field} must be an int, got {type(value).__name__}")
    length, worker, num_workers = operator.index(length), operator.index(worker), operator.index(num_workers)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, {num_workers}), got {worker}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return length * worker // num_workers, length * (worker + 1) // num_workers
