"""Bounds on every field that reaches the coordinator from the network, and safe logging of what it says.

Every byte from the network is hostile: each field has a size and charset bound, checked before the field is used
(parsed, compared, logged or stored). A field out of bounds raises ``Invalid`` (INVALID_ARGUMENT) naming the field
and its bound. Strings that reach a log line go through ``printable`` (no newlines or terminal escapes), and repeated
warnings through ``RateLimited``.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

from coordinator.errors import Invalid
from node.identity import PUBLIC_BYTES, SIGNATURE_BYTES
from node.membership import check_node_name

MAX_CONFIG_JSON = 64 << 10  # bytes of a Join's config_json
MAX_JSON_DEPTH = 16  # nesting of its arrays and objects
MAX_CAPABILITIES = 16
CAPABILITY_RE = re.compile(r"[A-Za-z0-9._=:/+-]{1,64}")
HEX_RE = re.compile(r"[0-9a-f]{1,128}")  # config_hash, task_fingerprint, model_digest
NODE_ID_RE = re.compile(r"[0-9a-f]{32}")
MAX_TOKEN = 256
MAX_REASON = 256  # a Leave's reason (kept, escaped, for the log only)


def printable(text: Any, limit: int = 200) -> str:
    """``text`` safe for one log line: control characters and escapes shown escaped, at most ``limit`` characters."""
    s = str(text)
    out = s[:limit].encode("unicode_escape", "backslashreplace").decode("ascii")
    return out + ("…" if len(s) > limit else "")


def json_depth(text: str, limit: int) -> int:
    """The nesting depth of the JSON arrays/objects in ``text`` (strings skipped), counting stops past ``limit``:
    checked before ``json.loads``, which a deeply nested document drives into RecursionError."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def check_join(name: str, config_json: str, config_hash: str, task_fingerprint: str, digest: str,
               capabilities: Iterable[str], public_key: bytes, signature: bytes) -> list[str]:
    """Raises ``Invalid`` for the first field of a Join out of its bounds; returns the capabilities as a list."""
    problem = check_node_name(name)
    if problem:
        raise Invalid(f"node_name: {problem}")
    if len(config_json) > MAX_CONFIG_JSON:
        raise Invalid(f"config_json: {len(config_json)} characters exceed the limit of {MAX_CONFIG_JSON}")
    if json_depth(config_json, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise Invalid(f"config_json: nested deeper than {MAX_JSON_DEPTH} levels")
    for field, value in (("config_hash", config_hash), ("task_fingerprint", task_fingerprint),
                         ("model_digest", digest)):
        if not HEX_RE.fullmatch(value):
            raise Invalid(f"{field}: must be 1–128 lowercase hex characters, got '{printable(value, 40)}'")
    caps = list(capabilities)
    if len(caps) > MAX_CAPABILITIES:
        raise Invalid(f"capabilities: {len(caps)} given, at most {MAX_CAPABILITIES}")
    for cap in caps:
        if not CAPABILITY_RE.fullmatch(cap):
            raise Invalid(f"capabilities: '{printable(cap, 40)}' is not 1–64 characters of letters, digits and "
                          "'._=:/+-'")
    if len(public_key) != PUBLIC_BYTES:
        raise Invalid(f"public_key: must be the node's {PUBLIC_BYTES}-byte ed25519 public key, got {len(public_key)} "
                      "bytes (a node older than protocol 2?)")
    if len(signature) != SIGNATURE_BYTES:
        raise Invalid(f"signature: must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    return caps


def check_token(field: str, token: str) -> None:
    if len(token) > MAX_TOKEN:
        raise Invalid(f"{field}: {len(token)} characters exceed the limit of {MAX_TOKEN}")


def check_node_id(node_id: str, field: str = "node_id") -> None:
    if not NODE_ID_RE.fullmatch(node_id):
        raise Invalid(f"{field}: must be the 32 hex characters Join returned, got '{printable(node_id, 40)}'")


class ReplayCache:
    """Signatures seen in the last ``window_s`` seconds, at most ``size`` of them: ``seen`` says whether one was
    already used (and records it). Only a key's holder can make a valid signature, so the cache cannot be flooded
    by others; older entries fall out once the timestamp window refuses them anyway."""

    def __init__(self, window_s: float, size: int = 4096) -> None:
        self.window_s, self.size = window_s, size
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, signature: bytes, now: float) -> bool:
        with self._lock:
            while self._seen and (len(self._seen) >= self.size or next(iter(self._seen.values())) < now - self.window_s):
                self._seen.popitem(last=False)
            if signature in self._seen:
                return True
            self._seen[signature] = now
            return False


class RateLimited:
    """Log a warning at most once per ``every_s`` seconds per key; the next one says how many were suppressed."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 keys: int = 1024) -> None:
        self.logger, self.every_s, self.clock, self.keys = logger, every_s, clock, keys
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: Any) -> None:
        self._log(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: Any) -> None:
        self._log(logging.INFO, key, msg, *args)

    def error(self, key: str, msg: str, *args: Any, exc_info: BaseException | None = None) -> None:
        self._log(logging.ERROR, key, msg, *args, exc_info=exc_info)

    def _log(self, level: int, key: str, msg: str, *args: Any, exc_info: BaseException | None = None) -> None:
        now = self.clock()
        with self._lock:
            last, suppressed = self._last.get(key, (float("-inf"), 0))
            if now - last < self.every_s:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
            self._last.move_to_end(key)
            while len(self._last) > self.keys:
                self._last.popitem(last=False)
        if suppressed:
            msg += f" ({suppressed} more like it in the last {self.every_s:.0f} s not shown)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
