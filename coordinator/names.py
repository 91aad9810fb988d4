"""Node names bound to keys for the whole run: trust on first use, kept in the coordinator's state dir.

The run's records go by name: the replicated robust state keeps each member's record, and its eviction, by name
(node/robust/state.py). While a name was bound to a key only as long as a live session held it, any key with the
join token could take an absent member's name: its frames then counted in that member's record, and a squatter that
got the name evicted had the honest key — which never sent a bad frame — refused for the rest of the run. So the
first key that joins under a name holds it from then on, across restarts: a Join under that name with another key is
ALREADY_EXISTS (the house code for a name held by another key), and every record of a name is one key's.

An eviction is recorded here by key as well, for good: the robust state forgets old evictions (it is bounded), this
table does not, so an evicted key stays refused whatever name it tries.

The cost: a node that loses its key file must join under a new name (its old name stays bound to the lost key),
unless an operator frees the name: ``lowband coordinator --forget-name NAME`` when the coordinator starts. The table
holds at most ``MAX_NAMES`` names; past that a new name is refused (RESOURCE_EXHAUSTED) until an operator frees some —
forgetting bindings by itself would let whoever fills the table take any absent member's name again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from coordinator.errors import Conflict, Full
from coordinator.store import NameRow
from node.identity import key_id

MAX_NAMES = 1 << 16


@dataclass
class Binding:
    key: bytes
    bound_at: float  # unix seconds of the first join under the name
    last_join: float  # unix seconds of the latest
    evicted: str = ""  # why its key was evicted ("": it was not)


class Names:
    """The bindings, in memory (the coordinator's lock guards them) and written with the members (``pending``)."""

    def __init__(self, rows: Iterable[NameRow]) -> None:
        self.bound = {name: Binding(key, at, last, why) for name, key, at, last, why in rows}
        self.evicted_keys = {b.key: b.evicted for b in self.bound.values() if b.evicted}
        self.dirty: set[str] = set()  # names whose row is not written yet

    def check(self, name: str, key: bytes) -> None:
        """Raises Conflict when ``name`` is bound to another key; Full when it is new and the table is full."""
        b = self.bound.get(name)
        if b is None:
            if len(self.bound) >= MAX_NAMES:
                raise Full(f"this coordinator has bound {len(self.bound)} names to keys, its limit: a new name is "
                           "refused until its operator frees some (lowband coordinator --forget-name NAME); join "
                           "under a name this key used before")
            return
        if b.key != key:
            since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(b.bound_at))
            raise Conflict(f"the name {name!r} is bound to key {key_id(b.key)} (the first key that joined under it, "
                           f"{since}); this node's key is {key_id(key)}. A name stays with its first key for the whole "
                           "run: start this node with another --name, or with the original key file (node.key in the "
                           "workdir that first joined as this name)")

    def bind(self, name: str, key: bytes, now: float) -> None:
        """Record a join under ``name`` by ``key`` (``check`` passed): binds a new name, or notes the join."""
        b = self.bound.get(name)
        if b is None:
            self.bound[name] = Binding(key, now, now)
        else:
            b.last_join = now
        self.dirty.add(name)

    def evict(self, key: bytes, why: str) -> None:
        """Refuse ``key`` from now on, under every name bound to it."""
        self.evicted_keys.setdefault(key, why)
        for name, b in self.bound.items():
            if b.key == key and not b.evicted:
                b.evicted = why
                self.dirty.add(name)

    def keys_of(self, names: Iterable[str]) -> dict[str, bytes]:
        return {n: self.bound[n].key for n in names if n in self.bound}

    def pending(self) -> list[NameRow]:
        return [(n, b.key, b.bound_at, b.last_join, b.evicted) for n, b in sorted(self.bound.items())
                if n in self.dirty]

    def saved(self) -> None:
        self.dirty.clear()
