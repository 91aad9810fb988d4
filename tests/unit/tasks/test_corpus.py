"""The stdlib corpus: deterministic, split by file, cached crash-safely, sharded without overlap."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from node.tasks import corpus as C


@pytest.fixture(autouse=True)
def _fresh_memo():
    """Every test sees the disk cache, not a corpus memoised by an earlier test."""
    C.clear_memo()
    yield
    C.clear_memo()


@pytest.fixture
def fake_stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small tree standing in for the stdlib, so that files can be edited and named at will."""
    root = tmp_path / "lib"
    files = {
        "a.py": b"print('a')\n",
        "pkg/__init__.py": b"",
        "pkg/mod.py": b"x = 1\n" * 50,
        "pkg/deep/z.py": b"def f():\n    return 2\n",
        "notes.txt": b"not python",
        "site-packages/third.py": b"third party",
        "pkg/dist-packages/other.py": b"third party too",
        **{f"gen/m{i:03d}.py": f"# module {i}\n".encode() * 3 for i in range(60)},
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    monkeypatch.setattr(C, "stdlib_root", lambda: root)
    return root


def test_list_source_files_excludes_third_party_and_sorts(fake_stdlib: Path) -> None:
    files = C.list_source_files(fake_stdlib)
    assert files == sorted(files)
    assert "a.py" in files and "pkg/deep/z.py" in files
    assert not any("site-packages" in f or "dist-packages" in f or not f.endswith(".py") for f in files)
    assert len(files) == 64


def test_streams_are_hash_ordered_files_joined_by_separator(fake_stdlib: Path, tmp_path: Path) -> None:
    corpus = C.load_stdlib_corpus(val_percent=20, cache_dir=tmp_path / "cache")
    files = C.list_source_files(fake_stdlib)
    order = sorted(files, key=lambda r: hashlib.sha256(r.encode()).hexdigest())
    val = [r for r in order if C.is_validation(r, 20)]
    train = [r for r in order if not C.is_validation(r, 20)]
    assert val and train
    assert bytes(corpus.train.numpy()) == b"\0".join((fake_stdlib / r).read_bytes() for r in train)
    assert bytes(corpus.val.numpy()) == b"\0".join((fake_stdlib / r).read_bytes() for r in val)
    assert corpus.num_files == 64
    assert corpus.train.dtype == torch.uint8 and corpus.train.dim() == 1


def test_content_change_changes_fingerprint_and_invalidates_cache(fake_stdlib: Path, tmp_path: Path) -> None:
    before = C.load_stdlib_corpus(cache_dir=tmp_path / "cache")
    (fake_stdlib / "a.py").write_bytes(b"print('changed, and longer')\n")
    C.clear_memo()
    after = C.load_stdlib_corpus(cache_dir=tmp_path / "cache")
    assert after.fingerprint != before.fingerprint
    assert b"changed, and longer" in bytes(after.train.numpy()) + bytes(after.val.numpy())


def test_val_percent_is_part_of_fingerprint(fake_stdlib: Path, tmp_path: Path) -> None:
    a = C.load_stdlib_corpus(val_percent=5, cache_dir=tmp_path)
    b = C.load_stdlib_corpus(val_percent=30, cache_dir=tmp_path)
    assert a.fingerprint != b.fingerprint and len(b.val) > len(a.val)


@pytest.mark.parametrize("bad", [-1, 101, 5.0, True])
def test_bad_val_percent_rejected(bad: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_percent"):
        C.load_stdlib_corpus(val_percent=bad, cache_dir=tmp_path)  # type: ignore[arg-type]


def test_real_stdlib_corpus_is_deterministic_and_tens_of_mb(tmp_path: Path) -> None:
    first = C.load_stdlib_corpus(cache_dir=tmp_path / "one")
    C.clear_memo()
    second = C.load_stdlib_corpus(cache_dir=tmp_path / "two")  # built again from source
    assert first.fingerprint == second.fingerprint and len(first.fingerprint) == 64
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert 10_000_000 <= len(first.train) <= 200_000_000
    assert 0.01 < len(first.val) / len(first.train) < 0.15
    assert first.num_files > 500


def test_real_split_is_by_file_and_disjoint() -> None:
    files = C.list_source_files(C.stdlib_root())
    val = {f for f in files if C.is_validation(f, 5)}
    train = set(files) - val
    assert val.isdisjoint(train) and val | train == set(files)
    assert 0.02 < len(val) / len(files) < 0.09
    assert all(C.is_validation(f, 5) == C.is_validation(f, 5) for f in files)
    assert not any(C.is_validation(f, 0) for f in files) and all(C.is_validation(f, 100) for f in files)


def test_memo_returns_same_object(tmp_path: Path) -> None:
    a = C.load_stdlib_corpus(cache_dir=tmp_path)
    assert C.load_stdlib_corpus(cache_dir=tmp_path) is a


def test_cache_round_trip_needs_no_rebuild(fake_stdlib: Path, tmp_path: Path) -> None:
    built = C.load_stdlib_corpus(cache_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    fp16 = built.fingerprint[:16]
    assert f"corpus-{fp16}-train.bin" in names and f"corpus-{fp16}-val.bin" in names
    assert not any(n.endswith(".tmp") for n in names)
    meta = json.loads(next(tmp_path.glob("corpus-key-*.json")).read_text())
    assert meta["fingerprint"] == built.fingerprint and meta["train_bytes"] == len(built.train)

    # The cache key is the files' names, sizes and times, not their bytes: a file rewritten with bytes of the same
    # length and its old times back tells a load from the cache (the old bytes) from a rebuild (the new ones).
    target = fake_stdlib / "pkg/mod.py"
    st = target.stat()
    target.write_bytes(b"y = 2\n" * 50)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    C.clear_memo()
    loaded = C.load_stdlib_corpus(cache_dir=tmp_path)
    assert loaded.fingerprint == built.fingerprint and loaded.num_files == built.num_files
    assert torch.equal(loaded.train, built.train) and torch.equal(loaded.val, built.val)
    assert b"y = 2" not in bytes(loaded.train.numpy()) + bytes(loaded.val.numpy())


def test_env_var_chooses_cache_dir(fake_stdlib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBAND_CACHE", str(tmp_path / "env"))
    C.load_stdlib_corpus()
    assert list((tmp_path / "env").glob("corpus-*-train.bin"))


@pytest.mark.parametrize("damage", ["truncate_train", "truncate_val", "delete_val", "garble_meta"])
def test_corrupt_cache_is_rebuilt(damage: str, fake_stdlib: Path, tmp_path: Path) -> None:
    built = C.load_stdlib_corpus(cache_dir=tmp_path)
    train_bin = next(tmp_path.glob("*-train.bin"))
    val_bin = next(tmp_path.glob("*-val.bin"))
    meta = next(tmp_path.glob("corpus-key-*.json"))
    if damage == "truncate_train":
        train_bin.write_bytes(train_bin.read_bytes()[:-7])
    elif damage == "truncate_val":
        val_bin.write_bytes(b"")
    elif damage == "delete_val":
        val_bin.unlink()
    else:
        meta.write_text("{not json")
    C.clear_memo()
    again = C.load_stdlib_corpus(cache_dir=tmp_path)
    assert torch.equal(again.train, built.train) and torch.equal(again.val, built.val)
    assert train_bin.stat().st_size == len(built.train) and val_bin.stat().st_size == len(built.val)
    assert json.loads(meta.read_text())["fingerprint"] == built.fingerprint


def test_unwritable_cache_still_returns_corpus(fake_stdlib: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    corpus = C.load_stdlib_corpus(cache_dir=blocker / "sub")
    assert len(corpus.train) > 0


@pytest.mark.parametrize("length,n", [(0, 1), (1, 3), (10, 3), (100, 7), (1_000_003, 16), (5, 5), (3, 8)])
def test_shard_bounds_disjoint_covering_balanced(length: int, n: int) -> None:
    bounds = [C.shard_bounds(length, w, n) for w in range(n)]
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    for (_, end), (start, _) in zip(bounds, bounds[1:]):
        assert end == start
    sizes = [e - s for s, e in bounds]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("args,field", [
    ((10, -1, 2), "worker"), ((10, 2, 2), "worker"), ((10, 0, 0), "num_workers"),
    ((10, 0, -3), "num_workers"), ((-1, 0, 1), "length"), ((10, 0.5, 2), "worker"),
])
def test_shard_bounds_errors_name_the_field(args: tuple, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        C.shard_bounds(*args)
