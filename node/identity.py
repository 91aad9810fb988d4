"""A node's identity: an ed25519 key pair kept in its workdir. Names are labels; keys are identities.

- ``NodeKey.load_or_create(workdir)``: ``workdir/node.key`` (PEM, PKCS#8, file mode 0600), created atomically on
  first use and reused by every later start of the node, so a restarted node proves it is the same node.
- ``signed_message(domain, *fields)``: the one canonical encoding every signature covers — msgpack of
  ``[domain, *fields]`` with fields restricted to str, bytes, int and bool — so a signature made for one purpose
  ("lowband/join/v1", "lowband/rpc/v1", later "lowband/frame/v1") is never valid for another.
- ``verify(public, signature, message)``: True or False, never raises on hostile input.

The cryptography is the ``cryptography`` package's; nothing here implements any of it. Only the standard library,
msgpack and cryptography are imported (``lowband node`` loads the key before it imports torch).
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.errors import ConfigError

log = logging.getLogger(__name__)

KEY_FILE = "node.key"
PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64
KEY_ID_HEX = 16  # characters of the key id: 64 bits of the public key's sha256


def key_id(public: bytes) -> str:
    """The short, stable id of a public key: the first 16 hex characters of its sha256 (for logs and Status)."""
    return hashlib.sha256(b"lowband/key-id/v1\0" + public).hexdigest()[:KEY_ID_HEX]


def signed_message(domain: str, *fields: str | bytes | int | bool) -> bytes:
    """The bytes a signature covers: msgpack of ``[domain, *fields]``. Raises TypeError for any other field type
    (a float or None would make two encoders disagree) and ValueError for an empty domain."""
    if not isinstance(domain, str) or not domain:
        raise ValueError("a signed message needs a non-empty domain tag, e.g. 'lowband/rpc/v1'")
    for f in fields:
        if not isinstance(f, (str, bytes, int, bool)):
            raise TypeError(f"signed message fields are str, bytes, int or bool, not {type(f).__name__}")
    return msgpack.packb([domain, *fields], use_bin_type=True)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public``'s ed25519 signature of ``message``; False for malformed keys or
    signatures (any length or content) instead of raising."""
    if not isinstance(public, bytes) or len(public) != PUBLIC_BYTES:
        return False
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class NodeKey:
    """An ed25519 private key with its raw public key (``public``, 32 bytes) and ``key_id``."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public: bytes = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                               serialization.PublicFormat.Raw)
        self.key_id: str = key_id(self.public)

    @classmethod
    def generate(cls) -> "NodeKey":
        """A fresh key held only in memory (tests, benchmarks, tools that need no stable identity)."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        """The 64-byte ed25519 signature of ``message`` (use ``signed_message`` to build it)."""
        return self._private.sign(message)

    def private_pem(self) -> bytes:
        return self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())

    @classmethod
    def from_pem(cls, data: bytes, source: str = "key") -> "NodeKey":
        """Raises ConfigError naming ``source`` when ``data`` is not an unencrypted PEM ed25519 private key."""
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(f"{source} holds a {type(private).__name__}, not an ed25519 node key")
        return cls(private)

    @classmethod
    def load_or_create(cls, workdir: str | Path, name: str = KEY_FILE) -> "NodeKey":
        """The key in ``workdir/name``, created (mode 0600, atomically: a concurrent creator's key wins and is
        read back) when missing. Raises ConfigError when the file is unreadable or not an ed25519 key; warns
        when it is readable by group or others."""
        path = Path(workdir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            cls._create(path)
        try:
            data = path.read_bytes()
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            raise ConfigError(f"cannot read the node key {path}: {exc}") from None
        if mode & 0o077:
            log.warning("node key %s is readable by others (mode %o): chmod 600 it", path, mode)
        return cls.from_pem(data, str(path))

    @classmethod
    def _create(cls, path: Path) -> None:
        key = cls.generate()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.private_pem())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process created it meanwhile: theirs is the node's key
                log.info("created key %s (ed25519, key id %s)", path, key.key_id)
            except FileExistsError:
                pass
        except OSError as exc:
            raise ConfigError(f"cannot create the node key {path}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
