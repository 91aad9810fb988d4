"""node/fsutil.write_atomic: readers see the old file or the new one; temporary files never stay behind."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from node.fsutil import write_atomic


@pytest.mark.parametrize("unique_tmp", [False, True])
def test_text_bytes_and_bytearrays_replace_the_file_and_leave_no_temp(tmp_path: Path, unique_tmp: bool) -> None:
    p = tmp_path / "f.json"
    write_atomic(p, "one", unique_tmp=unique_tmp)
    assert p.read_text() == "one"
    write_atomic(p, bytearray(b"two"), unique_tmp=unique_tmp)
    write_atomic(p, memoryview(b"three"), durable=False, unique_tmp=unique_tmp)
    assert p.read_bytes() == b"three"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.json"]


def test_a_crashed_writers_fixed_temp_file_is_taken_over(tmp_path: Path) -> None:
    p = tmp_path / "checkpoint.pt"
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half-written")  # what a crash mid-write leaves
    write_atomic(p, b"whole")
    assert p.read_bytes() == b"whole" and sorted(x.name for x in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("unique_tmp", [False, True])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path: Path, unique_tmp: bool) -> None:
    p = tmp_path / "f.bin"
    write_atomic(p, b"old")
    with pytest.raises(TypeError):
        write_atomic(p, 12345, unique_tmp=unique_tmp)  # type: ignore[arg-type]
    assert p.read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]


def test_concurrent_writers_with_unique_temps_each_leave_a_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "cache.bin"
    payloads = [bytes([i]) * 1_000_000 for i in range(8)]
    barrier = threading.Barrier(len(payloads))
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        barrier.wait()
        try:
            write_atomic(p, data, durable=False, unique_tmp=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(d,)) for d in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert p.read_bytes() in payloads  # one writer's bytes, whole
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cache.bin"]
