"""Adversarial review (adv-models): eviction ([recipe.reduce] evict_after) against a member that controls its own
name and key. The coordinator core is driven directly (tests/unit/coordinator/core_harness.py): real frames, real
signatures, real robust state; no sockets needed for these decisions.

- ``test_squatting_an_absent_honest_members_name_is_refused`` — the finding, fixed: names were bound to a key only
  while a live session held them, but eviction is recorded by *name* in the run's persistent robust state. An
  attacker that joined under an honest member's name while that member was away (a restart, a lease that expired)
  and sent a few loud frames got the *name* evicted; the honest node, with its own, never-evicted key, was then
  refused at Join for the rest of the run. Now a name is bound to the first key that joined under it, for the whole
  run (coordinator/names.py): the squatter is refused. The cost, and the operator's way out, are the next test; an
  evicted key stays refused across restarts, the one after.
- ``test_an_evicted_member_is_back_with_a_new_name_and_key`` — the documented limit (docs/security.md "Known
  limits"): with the join token a member that was evicted joins again under a fresh name and key and its frames
  count again; eviction costs it nothing but a new key.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "coordinator"))

from core_harness import Clock, Harness  # noqa: E402
from coordinator.errors import Conflict, Evicted  # noqa: E402
from coordinator.store import Store  # noqa: E402
from node import wire  # noqa: E402
from node.identity import NodeKey, key_id  # noqa: E402
from node.recipes import get_recipe  # noqa: E402
from node.robust.defaults import untrusted_overrides  # noqa: E402

HONEST = ("a", "b", "c")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(tmp_path: Path, clock: Clock) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(overrides: dict[str, dict[str, Any]] | None = None, state: str = "") -> Harness:
        h = Harness(tmp_path / (state or f"state{len(made)}"), clock, overrides)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


# the recommended settings for untrusted members, unchanged (evict_after 4 of 8)
_ROBUST = {"recipe": {"H": 1, **untrusted_overrides(get_recipe("sign"))},
           "membership": {"min_nodes": 3, "max_nodes": 8}}


def _robust(make: Callable[..., Harness]) -> Harness:
    return make(_ROBUST)


def _loud(h: Harness, sender: str, round_: int, key: NodeKey) -> bytes:
    """A well-formed frame signed by ``key`` for ``sender``, every magnitude 1e6 × a normal one (absurd)."""
    frame = h.frame(sender, round_)
    ref = h.core.reference
    env = wire.unpack(frame, ref.codec, ref.spec, h.cfg.run.run_id, round_)
    loud = {n: {k: (v * 1e6 if k in ref.codec.magnitude_buffers(enc) else v) for k, v in enc.items()}
            for n, enc in env.tensors.items()}
    return wire.pack(h.cfg.run.run_id, round_, sender, ref.codec, ref.spec, loud, key=key)


def _round(h: Harness, r: int, honest: tuple[str, ...], loud: tuple[str, NodeKey] | None, clock: Clock) -> None:
    for name in honest:
        h.submit(name, r)
    if loud is not None and loud[0] in {m.name for m in h.core.members.values()}:
        h.submit(loud[0], r, _loud(h, loud[0], r, loud[1]))
    h.core.collect(h.ids[honest[0]], r, 0.0, True)
    clock.advance(1.0)


def test_squatting_an_absent_honest_members_name_is_refused(make: Callable[..., Harness], clock: Clock) -> None:
    """The squatter of the original finding is refused at Join — across a coordinator restart too — and the honest
    node, back with its own key, takes its name and its clean record."""
    h = _robust(make)
    honest_c = h.key("c")
    for name in HONEST:
        h.join(name)
    _round(h, 0, HONEST, None, clock)
    h.core.leave(h.ids["c"], "restarting")  # the honest c is away for a moment (kill -9 + lease expiry alike)
    squatter = NodeKey.generate()
    with pytest.raises(Conflict) as refused:
        h.join("c", key=squatter)
    assert refused.value.code == "ALREADY_EXISTS"
    message = str(refused.value)
    assert f"the name 'c' is bound to key {key_id(honest_c.public)}" in message
    assert f"this node's key is {key_id(squatter.public)}" in message
    assert "another --name, or with the original key file" in message
    ids, keys = dict(h.ids), h.keys
    h.close()
    h = make(_ROBUST, "state0")  # a restart over the same state dir; a and b are still members
    h.ids, h.keys = ids, keys
    with pytest.raises(Conflict, match="bound to key"):
        h.join("c", key=squatter)
    h.join("c", key=honest_c)  # the honest node: admitted
    for r in range(1, 4):
        _round(h, r, HONEST, None, clock)
    record = h.core.status()["records"]["c"]
    assert record.evicted_at == -1 and record.flags == 0 and record.frames == 4  # its frames alone


def test_a_name_claimed_first_by_another_key_stays_its_until_an_operator_frees_it(
        make: Callable[..., Harness], clock: Clock, tmp_path: Path) -> None:
    """Trust on first use has a cost: a key that claims a name before its owner ever joined holds it (and so does a
    lost key file's). The operator frees a name at start (``lowband coordinator --forget-name``): not an evicted
    one, whose row is what refuses its key."""
    h = _robust(make)
    early = NodeKey.generate()
    h.join("c", key=early)
    h.core.leave(h.ids["c"], "gone")
    with pytest.raises(Conflict, match=f"bound to key {key_id(early.public)}"):
        h.join("c")
    h.close()
    store = Store(tmp_path / "state0")  # what --forget-name does before the coordinator loads its names
    assert store.forget_names(["c", "never-bound"]) == (["c"], [])
    store.close()
    h = make(_ROBUST, "state0")
    h.join("c")  # its own key now holds it
    with pytest.raises(Conflict, match="bound to key"):
        h.join("c", key=early)
    h.close()


def test_an_evicted_key_stays_refused_under_any_name_after_a_restart(make: Callable[..., Harness],
                                                                    clock: Clock) -> None:
    h = _robust(make)
    for name in (*HONEST, "m"):
        h.join(name)
    mkey = h.key("m")
    r = 0
    while "m" in {m.name for m in h.core.members.values()}:
        _round(h, r, HONEST, ("m", mkey), clock)
        r += 1
    h.close()
    h = make(_ROBUST, "state0")
    with pytest.raises(Evicted, match="was evicted from this run"):
        h.join("m2", key=mkey)
    assert h.store.forget_names(["m"]) == ([], ["m"])  # not freed: the row refuses its key
    h.close()


def test_an_evicted_member_is_back_with_a_new_name_and_key(make: Callable[..., Harness], clock: Clock) -> None:
    h = _robust(make)
    for name in (*HONEST, "m"):
        h.join(name)
    mkey = h.key("m")
    r = 0
    while "m" in {m.name for m in h.core.members.values()}:
        _round(h, r, HONEST, ("m", mkey), clock)
        r += 1
    with pytest.raises(Evicted):
        h.join("m")
    fresh = NodeKey.generate()
    h.keys["m2"] = fresh
    h.join("m2", key=fresh)  # the same attacker, a new key and name: admitted, a clean record
    for name in (*HONEST, "m2"):
        h.submit(name, r)
    h.core.collect(h.ids["m2"], r, 0.0, True)
    records = h.core.status()["records"]
    assert records["m"].evicted_at >= 0 and records["m2"].evicted_at == -1 and records["m2"].frames == 1
