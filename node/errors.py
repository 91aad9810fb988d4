"""Exception types shared by every layer. One type per kind of failure a caller must tell apart."""
from __future__ import annotations


class PayloadError(ValueError):
    """A payload or envelope from outside is malformed, oversized, stale or does not fit the model.

    Raised only by validation; the message names the offending field so that the sender's operator can
    act on it (it is relayed verbatim in gRPC status details).
    """


class ConfigError(ValueError):
    """A run configuration is invalid or incompatible; the message names the field."""
