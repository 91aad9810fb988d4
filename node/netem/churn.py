"""Churn schedules as data: what happens to which process at which round.

A schedule is a list of ``ChurnEvent``s ordered by round; ``random_schedule`` draws one from a seed, so a soak
run is reproducible (the same seed gives the same events; what the processes do in between still depends on
timing). Actions:

- ``kill``      SIGKILL a node's process group (its DHT/p2pd children die with it)
- ``restart``   start a killed node again with the same workdir (it resumes from its checkpoint)
- ``pause``     SIGSTOP a node for ``duration_rounds`` rounds (then SIGCONT): a frozen laptop
- ``join``      start a new node
- ``partition`` black-hole a node's link for ``duration_rounds`` rounds, then cut its connections and heal
- ``coordinator_kill`` / ``coordinator_restart``   the coordinator process (coordinator mode only)

Rounds are the run's committed rounds as the runner observes them; a restart or resume is scheduled by the
event that started the outage (``duration_rounds`` later).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

ACTIONS = ("kill", "restart", "pause", "join", "partition", "coordinator_kill", "coordinator_restart")


@dataclass(frozen=True)
class ChurnEvent:
    at_round: int
    action: str
    target: str = ""
    duration_rounds: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown churn action {self.action!r}; known: {', '.join(ACTIONS)}")
        if self.at_round < 0 or self.duration_rounds < 0:
            raise ValueError(f"churn event {self}: rounds must be ≥ 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_schedule(seed: int, nodes: list[str], rounds: int, events: int, coordinator_restarts: int = 0,
                    start_round: int = 3, max_out: int = 2) -> list[ChurnEvent]:
    """``events`` node events (kill+restart pairs, pauses, joins, one partition) spread over
    [start_round, rounds − 3), plus ``coordinator_restarts`` coordinator kill/restart pairs; at most ``max_out``
    nodes are out at any round, so a run of n nodes keeps n − max_out contributors."""
    if rounds < start_round + 6:
        raise ValueError(f"a churn schedule needs at least {start_round + 6} rounds, got {rounds}")
    rng = random.Random(seed)
    out_until: dict[str, int] = {}  # node → round it is back
    schedule: list[ChurnEvent] = []
    joined = 0
    span = rounds - 3 - start_round
    slots = sorted(rng.sample(range(start_round, rounds - 3), k=min(events, span)))
    # one partition and a join or two; the rest kills (each with its restart) and pauses. A join falls in the first
    # third of the span (its slot is moved there when drawn later): a joiner starts a process, finds the run and
    # fetches its state — seconds, several fast rounds — and must have rounds left to take part in
    kinds = [rng.choice(["kill", "pause"]) for _ in slots]
    special = rng.sample(range(len(slots)), k=min(len(slots), 1 + max(1, len(slots) // 10)))
    early = start_round + span // 3
    for i, idx in enumerate(special):
        kinds[idx] = "partition" if i == 0 else "join"
    for i, kind in enumerate(kinds):
        if kind == "join" and slots[i] > early:
            slots[i] = rng.randrange(start_round, early + 1)
    order = sorted(range(len(slots)), key=lambda i: slots[i])
    slots, kinds = [slots[i] for i in order], [kinds[i] for i in order]
    for at, kind in zip(slots, kinds):
        busy = {n for n, back in out_until.items() if back > at}
        free = [n for n in nodes if n not in busy]
        if kind == "join":
            joined += 1
            name = f"j{joined}"
            schedule.append(ChurnEvent(at, "join", name))
            nodes = [*nodes, name]
            continue
        if len(busy) >= max_out or not free:
            continue
        target = rng.choice(free)
        length = rng.randint(1, 3)
        back = min(at + length, rounds - 2)
        if kind == "kill":
            schedule += [ChurnEvent(at, "kill", target), ChurnEvent(back, "restart", target)]
        else:
            schedule.append(ChurnEvent(at, kind, target, back - at))
        out_until[target] = back + 1
    for i in range(coordinator_restarts):
        at = start_round + (i + 1) * span // (coordinator_restarts + 1)
        schedule += [ChurnEvent(at, "coordinator_kill"), ChurnEvent(at, "coordinator_restart")]
    return sorted(schedule, key=lambda e: (e.at_round, ACTIONS.index(e.action)))
