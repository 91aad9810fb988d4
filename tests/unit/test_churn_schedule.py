"""The soak's churn schedule (node/netem/churn.py): seeded, and a join always leaves the joiner rounds to take part in."""
from __future__ import annotations

from node.netem.churn import random_schedule

NODES = ["n0", "n1", "n2", "n3"]


def test_the_same_seed_gives_the_same_schedule() -> None:
    assert random_schedule(3, NODES, 24, 6, 1) == random_schedule(3, NODES, 24, 6, 1)


def test_every_join_falls_in_the_first_third_of_the_span() -> None:
    joins = 0
    for seed in range(200):
        for e in random_schedule(seed, NODES, 24, 6, 1):
            if e.action == "join":
                joins += 1
                assert 3 <= e.at_round <= 3 + (24 - 3 - 3) // 3, (seed, e)
    assert joins >= 200  # every schedule of 6 events has one
