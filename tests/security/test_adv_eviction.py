"""Adversarial review (adv-models): eviction ([recipe.reduce] evict_after) against a member that controls its own
name and key. The coordinator core is driven directly (tests/unit/coordinator/core_harness.py): real frames, real
signatures, real robust state; no sockets needed for these decisions.

- ``test_squatting_an_honest_name_gets_the_honest_node_refused_forever`` — SECURITY BUG (xfail, strict): names are
  bound to a key only while a live session holds them, but eviction is recorded by *name* in the run's persistent
  robust state. An attacker that joins under an honest member's name while that member is away (a restart, a lease
  that expired, or before it first joined: names are shown by Status) and sends a few loud frames gets the *name*
  evicted; the honest node, with its own, never-evicted key, is then refused at Join for the rest of the run.
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
from coordinator.errors import Refused  # noqa: E402
from node import wire  # noqa: E402
from node.identity import NodeKey  # noqa: E402
from node.recipes import get_recipe  # noqa: E402
from node.robust.defaults import untrusted_overrides  # noqa: E402

HONEST = ("a", "b", "c")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(tmp_path: Path, clock: Clock) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(overrides: dict[str, dict[str, Any]] | None = None) -> Harness:
        h = Harness(tmp_path / f"state{len(made)}", clock, overrides)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


def _robust(make: Callable[..., Harness]) -> Harness:
    # the recommended settings for untrusted members, unchanged (evict_after 4 of 8)
    return make({"recipe": {"H": 1, **untrusted_overrides(get_recipe("sign"))},
                 "membership": {"min_nodes": 3, "max_nodes": 8}})


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


@pytest.mark.xfail(strict=True, reason="SECURITY BUG: eviction is recorded by name; a squatter with its own key gets "
                                       "an honest member's name evicted and the honest key refused for good")
def test_squatting_an_honest_name_gets_the_honest_node_refused_forever(make: Callable[..., Harness],
                                                                        clock: Clock) -> None:
    h = _robust(make)
    honest_c = h.key("c")
    for name in HONEST:
        h.join(name)
    _round(h, 0, HONEST, None, clock)
    h.core.leave(h.ids["c"], "restarting")  # the honest c is away for a moment (kill -9 + lease expiry alike)
    squatter = NodeKey.generate()
    h.join("c", key=squatter)  # admitted: no live member is named c, and nothing binds the name to c's key
    r = 1
    while "c" in {m.name for m in h.core.members.values()}:
        _round(h, r, ("a", "b"), ("c", squatter), clock)
        r += 1
        assert r < 10
    # the squatter is gone — and so is the honest node, for the rest of the run (the name is in the persisted state)
    try:
        h.join("c", key=honest_c)
    except Refused as exc:
        pytest.fail(f"the honest node c, whose key never sent a bad frame, is refused: {exc}")


def test_an_evicted_member_is_back_with_a_new_name_and_key(make: Callable[..., Harness], clock: Clock) -> None:
    h = _robust(make)
    for name in (*HONEST, "m"):
        h.join(name)
    mkey = h.key("m")
    r = 0
    while "m" in {m.name for m in h.core.members.values()}:
        _round(h, r, HONEST, ("m", mkey), clock)
        r += 1
    with pytest.raises(Refused):
        h.join("m")
    fresh = NodeKey.generate()
    h.keys["m2"] = fresh
    h.join("m2", key=fresh)  # the same attacker, a new key and name: admitted, a clean record
    for name in (*HONEST, "m2"):
        h.submit(name, r)
    h.core.collect(h.ids["m2"], r, 0.0, True)
    records = h.core.status()["records"]
    assert records["m"].evicted_at >= 0 and records["m2"].evicted_at == -1 and records["m2"].frames == 1
