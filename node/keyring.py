"""Whose key signs whose frames: the one seam between identities (node/identity.py) and the frames a receiver
accepts (node/wire.py, ``Reference.unpack``).

A ``KeyRing`` maps a member's name to the ed25519 public key the run registered for it — the coordinator at Join
(relayed to nodes with each round's result), the in-process run at join, signed DHT member records in serverless
mode. A receiver given a key ring accepts a frame only when it is signed, the sender has a key in the ring, and the
signature verifies over ``signed_message("lowband/frame/v1", run id, round, sender, sha256(body))``. A receiver given
none (a plane that knows no keys, the simulator's oracles) checks no signature: every replica of a round must be given
the same ring, or none, for their decisions to agree.
"""
from __future__ import annotations

from typing import Iterator, Mapping

from node.identity import PUBLIC_BYTES, key_id, signed_message

FRAME_DOMAIN = "lowband/frame/v1"


def frame_message(run: str, round_: int, sender: str, body_sha256: bytes) -> bytes:
    """The bytes a frame's signature covers: (run id, round, sender, sha256 of the frame's body), domain-tagged."""
    return signed_message(FRAME_DOMAIN, run, round_, sender, body_sha256)


class KeyRing(Mapping[str, bytes]):
    """name → 32-byte ed25519 public key. Raises ValueError for a key that is not 32 bytes or a name that is not a
    non-empty string (a ring is built from what a plane was told, so a malformed entry is refused up front)."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        for name, public in keys.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"key ring: member name {name!r} is not a non-empty string")
            if not isinstance(public, bytes) or len(public) != PUBLIC_BYTES:
                raise ValueError(f"key ring: the key of {name!r} is not {PUBLIC_BYTES} bytes")
        self._keys = dict(keys)

    def __getitem__(self, name: str) -> bytes:
        return self._keys[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def describe(self, name: str) -> str:
        """``'w1' (key id 0123abcd…)`` for messages."""
        public = self._keys.get(name)
        return f"{name!r} (key id {key_id(public)})" if public is not None else f"{name!r} (no key)"

    @classmethod
    def of(cls, keys: Mapping[str, bytes] | None) -> "KeyRing | None":
        """A ring of ``keys``, or None when there are none (the plane knows no keys: nothing is verified)."""
        return cls(keys) if keys else None
