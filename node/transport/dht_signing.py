"""Signed DHT records: an ed25519 record validator on hivemind's ``RecordValidatorBase`` interface.

Every record lowband writes is a dictionary entry whose subkey is the writer's raw 32-byte ed25519 public key, so a
record names its writer and nobody can write in another's name. The validator runs inside each peer's DHT process
(hivemind calls it for every record that peer is asked to store and for every record another peer returns to it):

- ``sign_value`` (a store from this peer): a record whose subkey is this peer's key is wrapped in the envelope
  ``msgpack [MAGIC, run_id, value, signature]``, the signature covering ``signed_message(RECORD_DOMAIN, run_id,
  key_id, subkey, value, expiration)`` (``node.identity``: the one canonical encoding). A record under any other
  subkey is left unsigned, so it fails ``validate`` and is never stored: a peer cannot write in another's name.
- ``validate`` (a store asked of us, a record returned to us): the subkey is a 32-byte key, the envelope is
  well-formed and at most ``MAX_RECORD_BYTES``, the expiration at most ``MAX_TTL_S`` ahead (plus the clock-skew
  allowance), and the signature is the subkey's. Anything else is refused and counted (``rejections``).
- ``strip_value``: the value without the envelope (what the application reads back).

The key itself reaches the validator only as its DHT id (a sha1 of the key string), which binds the run id too; the
run id is also carried and signed in the envelope. What a record *means* — is its writer a member, is the outcome
supported, is a round number in range — is the application's to judge (``dht_trust``, ``dht_quorum``): the validator
only makes sure that what the application reads was written, unchanged, by the key that the subkey names.

Rejections are counted in the DHT process (the validator's copy lives there after hivemind forks it); the transport
asks for them with ``fetch_rejections`` (``DHT.run_coroutine``), per DHT key id.
"""
from __future__ import annotations

import hashlib
import logging
import struct
import threading
import uuid
from collections import Counter, OrderedDict
from functools import partial
from typing import Any

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from node.identity import PUBLIC_BYTES, SIGNATURE_BYTES, NodeKey, signed_message, verify

log = logging.getLogger(__name__)

RECORD_DOMAIN = "lowband/dht-record/v1"
MAGIC = "LBR1"
MAX_RECORD_BYTES = 256 << 10  # the largest record: a have-list or an outcome of a few hundred members
MAX_TTL_S = 8 * 24 * 3600.0  # the longest-lived record is the run's config (7 days)
CLOCK_SKEW_S = 30.0  # how far a peer's clock may run ahead of ours
MAX_RUN_ID = 256
_SEEN = 4096  # distinct rejected records remembered (so a record read on every poll is counted once)
_REGISTRY: dict[str, "SignedRecordValidator"] = {}  # token → validator, in this process (and, forked, in the DHT's)


def key_id(key: str) -> bytes:
    """The DHT id hivemind files ``key`` under (what a validator sees instead of the key string)."""
    return DHTID.generate(source=key).to_bytes()


def record_message(run_id: str, key: bytes, subkey: bytes, value: bytes, expiration: float) -> bytes:
    """What a record's signature covers; ``key``/``subkey``/``value`` are the bytes hivemind stores."""
    return signed_message(RECORD_DOMAIN, run_id, key, subkey, value, struct.pack("!d", expiration))


def envelope(signer: NodeKey, run_id: str, key: bytes, subkey: bytes, value: bytes, expiration: float) -> bytes:
    """The stored bytes of a record ``signer`` writes: what ``sign_value`` produces (tests forge records with it)."""
    signature = signer.sign(record_message(run_id, key, subkey, value, expiration))
    return msgpack.packb([MAGIC, run_id, value, signature], use_bin_type=True)


def parse_envelope(raw: bytes) -> tuple[str, bytes, bytes] | str:
    """(run_id, value, signature) of a stored record, or why it is not a lowband envelope."""
    if len(raw) > MAX_RECORD_BYTES:
        return "oversized"
    try:
        obj = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_RECORD_BYTES, max_str_len=MAX_RUN_ID,
                              max_array_len=4, max_map_len=0)
    except Exception:
        return "malformed"
    if not (isinstance(obj, list) and len(obj) == 4 and obj[0] == MAGIC and isinstance(obj[1], str)
            and isinstance(obj[2], bytes) and isinstance(obj[3], bytes)):
        return "unsigned"
    return obj[1], obj[2], obj[3]


def subkey_public(subkey: bytes) -> bytes | None:
    """The writer's public key that a stored subkey names, or None."""
    try:
        obj = msgpack.unpackb(subkey, raw=False, max_bin_len=PUBLIC_BYTES, max_str_len=0, max_array_len=0,
                              max_map_len=0)
    except Exception:
        return None
    return obj if isinstance(obj, bytes) and len(obj) == PUBLIC_BYTES else None


class SignedRecordValidator(RecordValidatorBase):
    """``key``: this peer's key, signing its own records for run ``run_id``; None for a peer that only reads and
    relays (``lowband dht``, ``lowband status``). Records of any run are validated (a DHT may carry several)."""

    def __init__(self, key: NodeKey | None = None, run_id: str = "") -> None:
        self._key, self._run_id = key, run_id
        self._public = msgpack.packb(key.public, use_bin_type=True) if key is not None else None
        self._lock = threading.Lock()
        self._counts: dict[bytes, Counter[str]] = {}  # DHT key id → reason → distinct records refused
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._valid: OrderedDict[bytes, None] = OrderedDict()  # records verified already (most recent last)
        self.token = uuid.uuid4().hex
        _REGISTRY[self.token] = self

    def close(self) -> None:
        _REGISTRY.pop(self.token, None)

    # -- hivemind's interface -------------------------------------------------------------------------------
    def sign_value(self, record: DHTRecord) -> bytes:
        if self._key is None or record.subkey != self._public:
            return record.value  # not ours to sign: it will fail validation and not be stored
        return envelope(self._key, self._run_id, record.key, record.subkey, record.value, record.expiration_time)

    def validate(self, record: DHTRecord) -> bool:
        why = self._problem(record)
        if why is None:
            return True
        self._count(record, why)
        return False

    def strip_value(self, record: DHTRecord) -> bytes:
        parsed = parse_envelope(record.value)
        return parsed[1] if isinstance(parsed, tuple) else record.value

    @property
    def priority(self) -> int:
        return 10  # as hivemind's RSASignatureValidator: applied before any validator that reads the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False  # each DHT gets exactly one; two would both have to pass

    # -- checks and counts ----------------------------------------------------------------------------------
    def _problem(self, record: DHTRecord) -> str | None:
        public = subkey_public(record.subkey)
        if public is None:
            return "no writer key in the subkey"
        if record.expiration_time > get_dht_time() + MAX_TTL_S + CLOCK_SKEW_S:
            return "expiration out of range"
        parsed = parse_envelope(record.value)
        if isinstance(parsed, str):
            return parsed
        run_id, value, signature = parsed
        # a record is read on every poll of every peer: verify each distinct one once
        digest = hashlib.sha256(b"\0".join((record.key, record.subkey, record.value,
                                            struct.pack("!d", record.expiration_time)))).digest()
        with self._lock:
            if digest in self._valid:
                self._valid.move_to_end(digest)
                return None
        if len(signature) != SIGNATURE_BYTES or not verify(
                public, signature, record_message(run_id, record.key, record.subkey, value, record.expiration_time)):
            return "bad signature"
        with self._lock:
            self._valid[digest] = None
            if len(self._valid) > _SEEN:
                self._valid.popitem(last=False)
        return None

    def _count(self, record: DHTRecord, why: str) -> None:
        digest = hashlib.sha256(b"\0".join((record.key, record.subkey, record.value))).digest()
        with self._lock:
            if digest in self._seen:
                return
            self._seen[digest] = None
            if len(self._seen) > _SEEN:
                self._seen.popitem(last=False)
            self._counts.setdefault(record.key, Counter())[why] += 1
            if len(self._counts) > _SEEN:  # bounded: the oldest key's counts go
                self._counts.pop(next(iter(self._counts)))
        log.debug("refused a DHT record: %s", why)

    def snapshot(self) -> dict[bytes, dict[str, int]]:
        with self._lock:
            return {k: dict(c) for k, c in self._counts.items()}


async def _rejections(token: str, _dht: Any, _node: Any) -> dict[bytes, dict[str, int]]:
    validator = _REGISTRY.get(token)
    return {} if validator is None else validator.snapshot()


def rejections_call(validator: SignedRecordValidator) -> Any:
    """A coroutine function for ``DHT.run_coroutine``: the counts of that validator's copy in the DHT process."""
    return partial(_rejections, validator.token)
