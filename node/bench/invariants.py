"""The invariants of a run, checked over its round logs (``node.roundlog``) after the fact: what churn, crashes
and restarts must never break. ``lowband bench soak`` reports them and the integration tests assert them.

Every check returns a list of problems, each a sentence naming the node, the round and the values that
disagree; an empty list means the run kept the invariant.
"""
from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

from node.roundlog import RoundRow

Entry = Mapping[str, Any]


def applied(entries: Sequence[Entry]) -> list[Entry]:
    """The applied-round entries of a node's round log (state adoptions left out)."""
    return [e for e in entries if "round" in e]


def round_sequence_problems(entries: Sequence[Entry], who: str) -> list[str]:
    """A node applies rounds in order, each exactly once; adopting a state (``"event": "state"``, the state after
    ``committed_rounds`` rounds) may move the next expected round forward, never back.

    Resuming from a checkpoint (``"event": "resumed"``, a checkpoint holding ``committed_rounds`` rounds) may move it
    back, never forward: a round logged before a kill -9 whose checkpoint was not written yet is applied again after
    the restart, from the state before it — not a double apply. Rounds before the checkpoint's stay applied once."""
    problems: list[str] = []
    expected: int | None = None
    seen: set[int] = set()
    for e in entries:
        event = e.get("event")
        if event == "state":
            c = e["committed_rounds"]
            if expected is not None and c < expected:
                problems.append(f"{who}: adopted the state after {c} rounds after applying round {expected - 1}")
            expected = c
            continue
        if event == "resumed":
            c = e["committed_rounds"]
            if expected is not None and c > expected:
                problems.append(f"{who}: resumed from a checkpoint after {c} rounds, but its log has only "
                                f"{expected} rounds applied")
            expected = c
            seen = {r for r in seen if r < c}
            continue
        r = e["round"]
        if r in seen:
            problems.append(f"{who}: applied round {r} twice")
        elif expected is not None and r != expected:
            problems.append(f"{who}: applied round {r}, expected round {expected}")
        seen.add(r)
        expected = r + 1
    return problems


def committed_problems(rows: Sequence[RoundRow]) -> list[str]:
    """The coordinator committed rounds 0, 1, … without a gap."""
    rounds = [row.round for row in rows]
    if rounds == list(range(len(rounds))):
        return []
    missing = sorted(set(range(max(rounds) + 1)) - set(rounds))
    return [f"the coordinator's committed rounds have gaps: missing {missing} of 0..{max(rounds)}"]


def _entry_problems(name: str, e: Entry, row: RoundRow | None, killed: bool) -> list[str]:
    r, members = e["round"], list(e["members"])
    problems = []
    if e["contributed"] and name not in members:
        problems.append(f"{name} round {r}: logged as contributed, but {name} is not among the members {members}")
    # A node that did not contribute is no member — except a node killed after its payload was taken, which,
    # restarted from an older checkpoint, catches up on that round by observing it.
    if not e["contributed"] and name in members and not (killed and e.get("observed")):
        problems.append(f"{name} round {r}: not logged as contributed, but {name} is among the members {members}")
    if row is None:
        return problems
    if e["fingerprint"] != row.fingerprint:
        problems.append(f"{name} round {r}: fingerprint {e['fingerprint']} differs from the coordinator's "
                        f"{row.fingerprint}")
    if e["coordinator_fingerprint"] != row.fingerprint:
        problems.append(f"{name} round {r}: the coordinator published fingerprint {e['coordinator_fingerprint']} "
                        f"but committed {row.fingerprint}")
    if members != list(row.members):
        problems.append(f"{name} round {r}: members {members} differ from the coordinator's {list(row.members)}")
    return problems


def replica_problems(logs: Mapping[str, Sequence[Entry]], rows: Sequence[RoundRow] | None = None,
                     killed: Collection[str] = ()) -> list[str]:
    """Every node's replica stays the run's (replica-consistent recipes).

    ``logs``: node name → its round log. ``rows``: the coordinator's committed rounds (coordinator mode), or None
    (serverless mode). ``killed``: nodes killed (SIGKILL) during the run. Checked: each node's round sequence; each
    applied round's ``contributed`` agrees with its members; in coordinator mode every applied round was committed,
    with the node's fingerprint, the published one and the committed one equal and the same members; in both
    modes, every node that applied a round has the same fingerprint and members for it as every other.
    """
    problems: list[str] = []
    by_round = {row.round: row for row in rows} if rows is not None else None
    if rows is not None:
        problems += committed_problems(rows)
    first: dict[int, tuple[str, Entry]] = {}  # round → the first node that applied it, and its entry
    for name, entries in logs.items():
        problems += round_sequence_problems(entries, name)
        for e in applied(entries):
            r = e["round"]
            row = None
            if by_round is not None:
                row = by_round.get(r)
                if row is None:
                    problems.append(f"{name} round {r}: applied, but the coordinator never committed it")
                    continue
            problems += _entry_problems(name, e, row, name in killed)
            other, o = first.setdefault(r, (name, e))
            if other == name:
                continue
            if e["fingerprint"] != o["fingerprint"]:
                problems.append(f"{name} round {r}: fingerprint {e['fingerprint']} differs from {other}'s "
                                f"{o['fingerprint']}")
            if list(e["members"]) != list(o["members"]):
                problems.append(f"{name} round {r}: members {list(e['members'])} differ from {other}'s "
                                f"{list(o['members'])}")
    return problems


def agreed_fingerprints(logs: Mapping[str, Sequence[Entry]]) -> dict[int, str]:
    """Round → the fingerprint after it, as the nodes applied it (the first node's, when they disagree: see
    ``replica_problems``)."""
    out: dict[int, str] = {}
    for entries in logs.values():
        for e in applied(entries):
            out.setdefault(e["round"], e["fingerprint"])
    return out
