"""Signed frames (node/wire.py, node/keyring.py): a frame is accepted only with a signature by the key registered for
the member it arrived from, over (run, round, sender, sha256 of the body); a replay into another round or run, a
swapped sender, a wrong key and any flipped bit are rejected, each with a precise reason — before any tensor is
decoded."""
from __future__ import annotations

import hashlib

import pytest
import torch

from node import wire
from node.errors import PayloadError, SignatureError
from node.identity import NodeKey
from node.keyring import FRAME_DOMAIN, KeyRing, frame_message
from wire_harness import RUN, ROUND, SIGN, SPEC, _encode_all

KEYS = {name: NodeKey.generate() for name in ("w1", "w2")}
RING = KeyRing({n: k.public for n, k in KEYS.items()})


def _signed(sender: str = "w1", round_: int = ROUND, run: str = RUN, key: NodeKey | None = None) -> bytes:
    return wire.pack(run, round_, sender, SIGN, SPEC, _encode_all(SIGN, SPEC), key=key or KEYS[sender])


def _unpack(frame: bytes, sender: str = "w1", round_: int | None = ROUND, run: str = RUN,
            keys: KeyRing | None = RING) -> wire.Envelope:
    return wire.unpack(frame, SIGN, SPEC, run, round_, sender=sender, keys=keys)


def _reason(frame: bytes, **kw: object) -> str:
    with pytest.raises(PayloadError) as info:
        _unpack(frame, **kw)  # type: ignore[arg-type]
    return str(info.value)


def test_a_signed_frame_verifies_and_carries_what_an_unsigned_one_does() -> None:
    frame = _signed()
    env = _unpack(frame)
    assert env.sender == "w1" and env.round == ROUND
    unsigned = wire.pack(RUN, ROUND, "w1", SIGN, SPEC, _encode_all(SIGN, SPEC))
    assert frame[:4] == wire.SIGNED_MAGIC and unsigned[:4] == wire.MAGIC
    assert len(frame) == len(unsigned) + 64 == wire.expected_size(SIGN, SPEC, RUN, "w1", ROUND, signed=True)
    body = frame[4:-8 - 64]
    assert body == unsigned[4:-8]  # the same body
    signature = frame[-8 - 64:-8]
    message = frame_message(RUN, ROUND, "w1", hashlib.sha256(body).digest())
    assert message.startswith(b"\x95\xb0" + FRAME_DOMAIN.encode())  # msgpack [domain, run, round, sender, digest]
    from node.identity import verify
    assert verify(KEYS["w1"].public, signature, message)
    for t in SPEC:
        assert all(torch.equal(a, b) for a, b in zip(env.tensors[t.name].values(),
                                                     _unpack(frame, keys=None).tensors[t.name].values()))


def test_a_frame_signed_by_another_key_is_rejected() -> None:
    assert _reason(_signed(key=NodeKey.generate())) == (
        f"signature does not verify against the key registered for {RING.describe('w1')} (another key signed it, or "
        "the frame changed after signing)")


def test_a_frame_replayed_in_another_round_says_so() -> None:
    assert _reason(_signed(round_=ROUND - 1)) == f"frame signed by 'w1' for round {ROUND - 1} replayed in round {ROUND}"


def test_a_frame_replayed_in_another_run_says_so() -> None:
    assert _reason(_signed(run="other-run")) == f"frame signed by 'w1' for run 'other-run' replayed in run {RUN!r}"


def test_a_frame_relayed_under_another_members_name_is_a_swapped_sender() -> None:
    reason = _reason(_signed("w1"), sender="w2")
    assert reason == f"frame signed by {RING.describe('w1')} arrived as 'w2''s (a swapped sender)"


def test_a_body_edited_after_signing_is_rejected_even_with_a_fresh_digest() -> None:
    frame = _signed()
    body, signature = frame[4:-72], frame[-72:-8]
    edited = body.replace(b"w1", b"w2", 1)  # the sender field, rewritten by whoever relays it
    forged = wire.SIGNED_MAGIC + edited + signature + hashlib.blake2b(edited + signature, digest_size=8).digest()
    assert "signature does not verify against the key registered for 'w2'" in _reason(forged, sender="w2")


def test_every_bit_flip_of_a_signed_frame_is_rejected() -> None:
    frame = wire.pack(RUN, ROUND, "w1", SIGN, [wire.TensorSpec("w", (3,))],
                      {"w": SIGN.encode(torch.tensor([1.0, -2.0, 3.0]))}, key=KEYS["w1"])
    for bit in range(8 * len(frame)):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(PayloadError) as info:
            wire.unpack(bytes(flipped), SIGN, [wire.TensorSpec("w", (3,))], RUN, ROUND, sender="w1", keys=RING)
        assert ("digest mismatch" if bit >= 32 else "magic") in str(info.value), bit


def test_an_unsigned_frame_or_an_unknown_sender_is_refused_where_keys_are_checked() -> None:
    unsigned = wire.pack(RUN, ROUND, "w1", SIGN, SPEC, _encode_all(SIGN, SPEC))
    assert _reason(unsigned) == "frame from 'w1' is not signed, and this run verifies every frame against its " \
                                "sender's key"
    assert _unpack(unsigned, keys=None).sender == "w1"  # a plane that knows no keys checks none
    stranger = NodeKey.generate()
    assert _reason(_signed("w3", key=stranger), sender="w3") == ("no key is registered for sender 'w3': its frames "
                                                                 "cannot be verified")


def test_the_sender_the_body_names_must_be_the_one_it_came_from() -> None:
    assert _reason(_signed("w1"), sender="w2", keys=None) == "frame names sender 'w1' but came from 'w2'"


def test_without_an_expected_round_the_signature_is_checked_over_the_body_s_claims() -> None:
    assert _unpack(_signed(round_=3), round_=None).round == 3
    assert "does not verify" in _reason(_signed(key=NodeKey.generate()), round_=None)


def test_signature_failures_are_told_apart_from_other_invalid_frames() -> None:
    """A SignatureError (a PayloadError: refused alike) for what the signature says; anything else stays a plain
    PayloadError (the coordinator counts the two apart)."""
    unsigned = wire.pack(RUN, ROUND, "w1", SIGN, SPEC, _encode_all(SIGN, SPEC))
    for frame, kw in ((_signed(key=NodeKey.generate()), {}), (_signed(round_=ROUND - 1), {}), (unsigned, {}),
                      (_signed("w1"), {"sender": "w2"})):
        with pytest.raises(SignatureError):
            _unpack(frame, **kw)  # type: ignore[arg-type]
    for frame, kw in ((_signed()[:-1] + b"\0", {}), (_signed("w1"), {"sender": "w2", "keys": None})):
        with pytest.raises(PayloadError) as info:
            _unpack(frame, **kw)  # type: ignore[arg-type]
        assert not isinstance(info.value, SignatureError), info.value


def test_a_key_ring_refuses_malformed_keys() -> None:
    with pytest.raises(ValueError, match="not 32 bytes"):
        KeyRing({"w1": b"short"})
    with pytest.raises(ValueError, match="non-empty string"):
        KeyRing({"": KEYS["w1"].public})
    assert KeyRing.of({}) is None and KeyRing.of({"w1": KEYS["w1"].public}) is not None
