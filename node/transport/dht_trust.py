"""Who may write what in a serverless run: the run's authority, join grants, member records, and the count of
everything ignored.

- **The authority** (``RunAuthority``) is an ed25519 key made by ``lowband run init``. It signs the run record — the
  run config, task fingerprint, model digest and DHT settings that every node must share — and the signature travels
  in the run file (``[authority]``). A ``config`` record in the DHT counts only with that signature: there is no
  "earliest record wins", so nobody can lock a run out by publishing first.
- **Grants.** In a closed run (the default) a node may join only with a grant: the authority's signature over
  (run id, the node's public key, its name), made by ``lowband run grant``. An open run (``lowband run init --open``)
  lets any key with the run file join; names are then first come, first served.
- **Member records.** Every value lowband stores is ``msgpack [run_id, name, grant, body]`` under the writer's key
  (``dht_signing``: the DHT layer checks that the key signed it). ``RunTrust.open`` accepts a record only from a
  member of this run: the right run id, a well-formed name, a valid grant (closed runs), not a name another live
  member holds, not beyond ``max_nodes``. Names are labels; keys are identities.
- **Rejections** (``Rejections``): every record ignored — here, by the DHT process's validator, or by a rule of
  ``dht_quorum`` — is counted once per (kind, reason), logged at most once a minute per reason, and exposed on the
  transport and in the heartbeat (``lowband status --dht`` shows it).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import msgpack

from node.errors import ConfigError
from node.identity import PUBLIC_BYTES, SIGNATURE_BYTES, NodeKey, key_id, signed_message, verify

log = logging.getLogger(__name__)

RUN_DOMAIN = "lowband/run/v1"
GRANT_DOMAIN = "lowband/grant/v1"
MAX_NAME = 256  # as node/wire.py: a frame's sender
MAX_BODY = 200_000  # bytes of one record's body once unpacked (the DHT layer bounds the whole record)
_SEEN = 4096


# -- the authority ------------------------------------------------------------------------------------------
def run_record(config: Mapping[str, Any], task_fingerprint: str, model_digest: str, *, num_shards: int,
               min_nodes: int, open_run: bool, sharding: Mapping[str, Any] | None = None) -> str:
    """The canonical JSON the authority signs: everything that must be equal on every node of the run.
    ``sharding``: ``RunFile.dht_record()`` (empty at its defaults, so older signatures still verify)."""
    record = {**config, "task_fingerprint": task_fingerprint, "model_digest": model_digest,
              "dht": {"num_shards": num_shards, "min_nodes": min_nodes, "open": open_run, **(sharding or {})}}
    return json.dumps(record, sort_keys=True, default=str)


def _hex(section: Mapping[str, Any], name: str, size: int, source: str) -> bytes:
    value = section.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ConfigError(f"{source}: [authority] {name} must be {size * 2} hex characters")
    return raw


@dataclass(frozen=True)
class RunAuthority:
    """The run file's ``[authority]``: the authority's public key, its signature of the run record, open or not."""

    public: bytes
    signature: bytes
    open_run: bool = False

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    @classmethod
    def from_section(cls, section: Mapping[str, Any], source: str = "run file") -> "RunAuthority":
        if not section:
            raise ConfigError(f"{source} has no [authority] section: serverless runs need a run file signed by its "
                              "authority (`lowband run init`)")
        unknown = set(section) - {"public_key", "signature", "open"}
        if unknown:
            raise ConfigError(f"{source}: unknown [authority] keys {sorted(unknown)}")
        open_run = section.get("open", False)
        if not isinstance(open_run, bool):
            raise ConfigError(f"{source}: [authority] open must be true or false")
        return cls(_hex(section, "public_key", PUBLIC_BYTES, source),
                   _hex(section, "signature", SIGNATURE_BYTES, source), open_run)

    def section(self) -> dict[str, Any]:
        return {"public_key": self.public.hex(), "signature": self.signature.hex(), "open": self.open_run}

    @staticmethod
    def sign(key: NodeKey, run_id: str, record_json: str) -> bytes:
        return key.sign(signed_message(RUN_DOMAIN, run_id, record_json))

    def signed(self, run_id: str, record_json: str, signature: bytes | None = None) -> bool:
        """Whether ``signature`` (default: the run file's) is this authority's over ``record_json``."""
        return verify(self.public, self.signature if signature is None else signature,
                      signed_message(RUN_DOMAIN, run_id, record_json))


# -- grants -------------------------------------------------------------------------------------------------
def grant_message(run_id: str, public: bytes, name: str) -> bytes:
    return signed_message(GRANT_DOMAIN, run_id, public, name)


def make_grant(authority: NodeKey, run_id: str, public: bytes, name: str) -> bytes:
    """The authority's grant: ``public`` may join run ``run_id`` as ``name``."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"grant name: {problem}")
    return authority.sign(grant_message(run_id, public, name))


def name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        return f"a name is 1 to {MAX_NAME} characters"
    if not name.isprintable() or name != name.strip():
        return "a name has no control characters and no leading or trailing spaces"
    return None


# -- counting what is ignored -------------------------------------------------------------------------------
class Rejections:
    """Records ignored, by (kind, reason): each distinct record counted once, each reason logged at most once per
    ``log_every_s`` (a forged record is read on every poll)."""

    def __init__(self, who: str, log_every_s: float = 60.0) -> None:
        self.who, self.log_every_s = who, log_every_s
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._seen: OrderedDict[Any, None] = OrderedDict()
        self._logged: dict[tuple[str, str], float] = {}
        self._dht: dict[tuple[str, str], int] = {}  # the DHT process's validator's counts, as last fetched

    def add(self, kind: str, reason: str, record: Any = None) -> None:
        """Count one ignored record (``record``: what identifies it, so the same one read again is not counted)."""
        with self._lock:
            if record is not None:
                ident = (kind, reason, record)
                if ident in self._seen:
                    return
                self._seen[ident] = None
                if len(self._seen) > _SEEN:
                    self._seen.popitem(last=False)
            self._counts[(kind, reason)] += 1
            n = self._counts[(kind, reason)]
            now = time.monotonic()
            due = now >= self._logged.get((kind, reason), -1e18) + self.log_every_s
            if due:
                self._logged[(kind, reason)] = now
        if due:
            log.warning("[node=%s] ignoring %s records: %s (%d so far; logged at most once a minute)", self.who, kind,
                        reason, n)

    def set_validator_counts(self, counts: Mapping[tuple[str, str], int]) -> None:
        with self._lock:
            self._dht = dict(counts)

    def snapshot(self) -> dict[str, int]:
        """``"kind: reason"`` → records ignored, here and by the DHT process's validator."""
        with self._lock:
            merged: Counter[tuple[str, str]] = Counter(self._counts)
            merged.update(self._dht)
        return {f"{k}: {r}": n for (k, r), n in sorted(merged.items())}

    def total(self) -> int:
        return sum(self.snapshot().values())


def key_kind(run_id: str, key: str) -> str:
    """What kind of record a DHT key holds (for counts and logs)."""
    rest = key[len(run_id) + 1:] if key.startswith(run_id + "/") else key
    if rest.startswith("round/"):
        tail = rest.rsplit("/", 1)[-1]
        return tail if tail in ("have", "done", "shard") else "announce"
    return rest or "other"


# -- member records -----------------------------------------------------------------------------------------
def pack_record(run_id: str, name: str, grant: bytes, body: Any) -> bytes:
    return msgpack.packb([run_id, name, grant, body], use_bin_type=True)


def unpack_record(raw: bytes) -> tuple[Any, Any, bytes, Any] | None:
    """(run_id, name, grant, body) of a stored value, bounded; None when it is not one."""
    try:
        obj = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_BODY, max_str_len=MAX_BODY, max_array_len=MAX_BODY,
                              max_map_len=64)
    except Exception:
        return None
    if not (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[2], bytes)):
        return None
    return obj[0], obj[1], obj[2], obj[3]


@dataclass
class Member:
    """A live member as its heartbeat says: for name clashes and ``max_nodes``."""

    key: bytes
    name: str
    since: int


@dataclass
class RunTrust:
    """One node's view of who may write in run ``run_id``. ``authority`` None: an open run with no authority at all
    (transport tests); ``key``/``name``/``grant``: this node's own identity."""

    run_id: str
    key: NodeKey
    name: str
    authority: RunAuthority | None = None
    grant: bytes = b""
    max_nodes: int = 1 << 16
    rejections: Rejections = field(default=None)  # type: ignore[assignment]
    _verified: dict[tuple[bytes, str, bytes], bool] = field(default_factory=dict)
    _roster: dict[bytes, Member] = field(default_factory=dict)  # live members by key, from the last heartbeat read
    #: name → the key of the last record of this name that passed every check: whose key signs that member's frames
    writers: dict[str, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.rejections is None:
            self.rejections = Rejections(self.name)

    @property
    def closed(self) -> bool:
        return self.authority is not None and not self.authority.open_run

    def granted(self, public: bytes, name: str, grant: bytes) -> bool:
        """Whether ``public`` may write as ``name`` (cached: a grant is checked once)."""
        if not self.closed:
            return True
        assert self.authority is not None
        ident = (public, name, grant)
        with self._lock:
            hit = self._verified.get(ident)
        if hit is None:
            hit = verify(self.authority.public, grant, grant_message(self.run_id, public, name))
            with self._lock:
                if len(self._verified) > _SEEN:
                    self._verified.clear()
                self._verified[ident] = hit
        return hit

    def pack(self, body: Any) -> bytes:
        return pack_record(self.run_id, self.name, self.grant, body)

    def open_one(self, kind: str, public: Any, raw: Any, roster: bool = True) -> tuple[str, Any] | None:
        """(name, body) of one record if a member of this run wrote it; else None, counted. ``roster`` False: skip
        the checks against the live members (for the heartbeats, which the roster is made of)."""
        if not (isinstance(public, bytes) and len(public) == PUBLIC_BYTES and isinstance(raw, bytes)):
            self.rejections.add(kind, "not a lowband record", (public, raw) if isinstance(raw, bytes) else None)
            return None
        obj = unpack_record(raw)
        if obj is None:
            self.rejections.add(kind, "malformed record", (public, raw))
            return None
        run_id, name, grant, body = obj
        if run_id != self.run_id:
            self.rejections.add(kind, "written for another run", (public, raw))
            return None
        if name_problem(name) is not None:
            self.rejections.add(kind, "malformed name", (public, raw))
            return None
        if not self.granted(public, name, grant):
            self.rejections.add(kind, "writer has no grant from the run's authority", (public, raw))
            return None
        if not roster:
            return name, body
        holder = self.holder(name)
        if holder is not None and holder != public:
            self.rejections.add(kind, "name held by another member's key", (public, raw))
            return None
        if not self.within_max(public):
            self.rejections.add(kind, "writer is beyond the run's max_nodes", (public, raw))
            return None
        with self._lock:
            if len(self.writers) > _SEEN and name not in self.writers:
                self.writers.clear()
            self.writers[name] = public
        return name, body

    def open(self, kind: str, records: Mapping[Any, Any]) -> dict[str, Any]:
        """name → body of the member records among ``records`` (subkey → stored value)."""
        out: dict[str, Any] = {}
        for public, raw in records.items():
            got = self.open_one(kind, public, raw)
            if got is not None:
                out[got[0]] = got[1]
        return out

    # -- the roster: live members, for name clashes and max_nodes ---------------------------------------------
    def update_roster(self, members: Iterable[Member]) -> None:
        with self._lock:
            self._roster = {m.key: m for m in members}

    def ranked(self) -> list[Member]:
        """Live members in the order seats are kept: earliest ``since`` first, ties by key."""
        with self._lock:
            return sorted(self._roster.values(), key=lambda m: (m.since, m.key))

    def holder(self, name: str) -> bytes | None:
        """The key that holds ``name`` among live members (the earliest to have joined), or None."""
        for m in self.ranked():
            if m.name == name:
                return m.key
        return None

    def within_max(self, public: bytes) -> bool:
        ranked = self.ranked()
        keys = [m.key for m in ranked]
        return public not in keys or keys.index(public) < self.max_nodes
