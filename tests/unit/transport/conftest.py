"""Fixtures for the real-p2pd DhtTransport tests (module-scoped: a DHT per peer is slow to start); they live in
tests/dht_harness.py, shared with tests/fault."""
from __future__ import annotations

from dht_harness import no_orphaned_p2pd, setup

__all__ = ["no_orphaned_p2pd", "setup"]
