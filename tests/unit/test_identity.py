"""node/identity.py: a node key kept in its workdir (0600, created atomically, reused), signatures with a domain tag
over a canonical encoding, and verification that never raises on hostile input."""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from node.errors import ConfigError
from node.identity import KEY_FILE, NodeKey, key_id, signed_message, verify


def test_the_key_is_created_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    k1 = NodeKey.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    k2 = NodeKey.load_or_create(tmp_path)
    assert (k1.public, k1.key_id) == (k2.public, k2.key_id) and len(k1.public) == 32
    assert k1.key_id == key_id(k1.public) and len(k1.key_id) == 16
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temporary left behind


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    keys: list[bytes] = []
    start = threading.Barrier(8)

    def make() -> None:
        start.wait()
        keys.append(NodeKey.load_or_create(tmp_path).public)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(keys) == 8 and len(set(keys)) == 1


def test_a_key_file_that_is_not_an_ed25519_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="node.key is not an unencrypted PEM private key"):
        NodeKey.load_or_create(tmp_path)


def test_signatures_cover_the_domain_and_every_field() -> None:
    key = NodeKey.generate()
    msg = signed_message("lowband/rpc/v1", "Heartbeat", "ab" * 16, 1700000000000, b"\x00digest", True)
    sig = key.sign(msg)
    assert verify(key.public, sig, msg)
    assert not verify(key.public, sig, signed_message("lowband/frame/v1", "Heartbeat", "ab" * 16, 1700000000000,
                                                       b"\x00digest", True))  # another domain
    assert not verify(key.public, sig, signed_message("lowband/rpc/v1", "Heartbeat", "ab" * 16, 1700000000001,
                                                       b"\x00digest", True))
    assert not verify(NodeKey.generate().public, sig, msg)
    # the encoding is canonical msgpack: a string and the same bytes differ, a list cannot be smuggled in
    assert signed_message("d", "x") != signed_message("d", b"x")
    with pytest.raises(TypeError):
        signed_message("d", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        signed_message("d", ["x"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        signed_message("", "x")


@pytest.mark.parametrize("public, signature", [(b"", b""), (b"x" * 31, b"s" * 64), (b"x" * 32, b"s" * 63),
                                               (b"\xff" * 32, b"\xff" * 64), (os.urandom(32), os.urandom(64))])
def test_verify_never_raises_on_hostile_input(public: bytes, signature: bytes) -> None:
    assert verify(public, signature, b"message") is False
