"""Exception types shared by every layer. One type per kind of failure a caller must tell apart."""
from __future__ import annotations


class PayloadError(ValueError):
    """A payload or envelope from outside is malformed, oversized, stale or does not fit the model.

    Raised only by validation; the message names the offending field so that the sender's operator can
    act on it (it is relayed verbatim in gRPC status details).
    """


class SignatureError(PayloadError):
    """A frame's signature is missing or does not verify against its sender's key (a replay, a swapped sender, a
    wrong key or an edited body: the message says which). A PayloadError, so every caller that refuses invalid
    frames refuses these too; told apart where a refusal is counted by kind (the coordinator's metrics)."""


class ConfigError(ValueError):
    """A run configuration is invalid or incompatible; the message names the field."""
