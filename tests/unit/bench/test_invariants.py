"""The run invariants over round logs (node/bench/invariants.py): a clean log passes, and each way of breaking
an invariant is reported once, naming the node, the round and the values."""
from __future__ import annotations

from typing import Any

from node.bench.invariants import agreed_fingerprints, committed_problems, replica_problems, round_sequence_problems
from node.roundlog import RoundRow


def entry(r: int, members: list[str], who: str, fp: str | None = None, **extra: Any) -> dict[str, Any]:
    fp = fp or f"fp{r}"
    return {"round": r, "members": members, "contributed": who in members and not extra.get("observed"),
            "fingerprint": fp, "coordinator_fingerprint": extra.pop("published", fp), **extra}


def state(committed: int) -> dict[str, Any]:
    return {"event": "state", "committed_rounds": committed, "fingerprint": f"fp{committed - 1}"}


def row(r: int, members: list[str], fp: str | None = None) -> RoundRow:
    return RoundRow(round=r, committed_at=0.0, members=members, reason="", fingerprint=fp or f"fp{r}", bytes_in=0,
                    bytes_out=0, duration_s=0.0, mean_loss=0.0, val_loss=float("nan"))


AB = ["a", "b"]


def test_rounds_in_order_with_a_forward_state_adoption_pass() -> None:
    log = [entry(0, AB, "a"), entry(1, AB, "a"), state(5), entry(5, AB, "a")]
    assert round_sequence_problems(log, "a") == []


def test_a_skipped_round_a_repeated_round_and_a_state_going_back_are_named() -> None:
    assert round_sequence_problems([entry(0, AB, "a"), entry(2, AB, "a")], "a") == [
        "a: applied round 2, expected round 1"]
    assert round_sequence_problems([entry(0, AB, "a"), entry(1, AB, "a"), entry(1, AB, "a")], "a") == [
        "a: applied round 1 twice"]
    assert round_sequence_problems([entry(0, AB, "a"), entry(1, AB, "a"), state(1)], "a") == [
        "a: adopted the state after 1 rounds after applying round 1"]


def resumed(committed: int) -> dict[str, Any]:
    return {"event": "resumed", "committed_rounds": committed, "fingerprint": f"fp{committed - 1}"}


def test_a_round_logged_before_a_kill_and_applied_again_after_resuming_is_no_double_apply() -> None:
    # round 2 logged, then kill -9 before its checkpoint was written: the restart resumes after 2 rounds, applies 2 again
    log = [entry(0, AB, "a"), entry(1, AB, "a"), entry(2, AB, "a"), resumed(2), entry(2, AB, "a"), entry(3, AB, "a")]
    assert round_sequence_problems(log, "a") == []
    # an older checkpoint (checkpoint_every > 1): every round after it is applied again, once
    log = [entry(0, AB, "a"), entry(1, AB, "a"), entry(2, AB, "a"), resumed(1), entry(1, AB, "a"), entry(2, AB, "a")]
    assert round_sequence_problems(log, "a") == []
    # a resume where nothing was lost, then a state adoption forward
    assert round_sequence_problems([entry(0, AB, "a"), resumed(1), state(4), entry(4, AB, "a")], "a") == []
    assert replica_problems({"a": [entry(0, AB, "a"), entry(1, AB, "a"), resumed(1), entry(1, AB, "a")],
                             "b": [entry(0, AB, "b"), entry(1, AB, "b")]}, [row(0, AB), row(1, AB)]) == []


def test_a_resume_allows_no_double_apply_after_it_nor_a_skip_nor_a_checkpoint_ahead_of_the_log() -> None:
    # the step back is allowed only at the resume: a round re-applied twice after it is still a double apply
    assert round_sequence_problems([entry(0, AB, "a"), entry(1, AB, "a"), resumed(1), entry(1, AB, "a"),
                                    entry(1, AB, "a")], "a") == ["a: applied round 1 twice"]
    # rounds before the checkpoint's are not applied again
    assert round_sequence_problems([entry(0, AB, "a"), entry(1, AB, "a"), resumed(1), entry(0, AB, "a")], "a") == [
        "a: applied round 0 twice"]
    # without a resume, a step back is a double apply
    assert round_sequence_problems([entry(0, AB, "a"), entry(1, AB, "a"), entry(1, AB, "a")], "a") == [
        "a: applied round 1 twice"]
    # after the resume, rounds go on in order from the checkpoint
    assert round_sequence_problems([entry(0, AB, "a"), entry(1, AB, "a"), resumed(1), entry(2, AB, "a")], "a") == [
        "a: applied round 2, expected round 1"]
    # a checkpoint holding a round the log never recorded
    assert round_sequence_problems([entry(0, AB, "a"), resumed(3)], "a") == [
        "a: resumed from a checkpoint after 3 rounds, but its log has only 1 rounds applied"]


def test_committed_rounds_with_a_gap_are_named() -> None:
    assert committed_problems([row(0, AB), row(1, AB)]) == []
    assert committed_problems([row(0, AB), row(2, AB), row(4, AB)]) == [
        "the coordinator's committed rounds have gaps: missing [1, 3] of 0..4"]


def test_replicas_that_agree_with_the_coordinator_pass() -> None:
    logs = {n: [entry(0, AB, n), entry(1, AB, n)] for n in AB}
    rows = [row(0, AB), row(1, AB)]
    assert replica_problems(logs, rows) == []
    assert replica_problems(logs, None) == []
    assert agreed_fingerprints(logs) == {0: "fp0", 1: "fp1"}


def test_every_disagreement_with_the_coordinator_is_named() -> None:
    rows = [row(0, AB), row(1, AB)]
    logs = {"a": [entry(0, AB, "a", fp="x"), entry(1, ["a"], "a"), entry(2, AB, "a")],
            "b": [entry(0, AB, "b", published="y")]}
    assert replica_problems(logs, rows) == [
        "a round 0: fingerprint x differs from the coordinator's fp0",
        "a round 0: the coordinator published fingerprint x but committed fp0",
        "a round 1: members ['a'] differ from the coordinator's ['a', 'b']",
        "a round 2: applied, but the coordinator never committed it",
        "b round 0: the coordinator published fingerprint y but committed fp0",
        "b round 0: fingerprint fp0 differs from a's x",
    ]


def test_serverless_replicas_must_agree_with_each_other() -> None:
    logs = {"a": [entry(0, AB, "a")], "b": [entry(0, AB, "b", fp="z")], "c": [entry(0, ["a", "c"], "c")]}
    assert replica_problems(logs, None) == [
        "b round 0: fingerprint z differs from a's fp0",
        "c round 0: members ['a', 'c'] differ from a's ['a', 'b']",
    ]


def test_contributed_must_match_membership_unless_a_killed_node_catches_up() -> None:
    observed_own = entry(1, AB, "b", observed=True)  # b among the members, applied by observing
    assert not observed_own["contributed"]
    logs = {"a": [entry(0, AB, "a"), entry(1, AB, "a")], "b": [entry(0, AB, "b"), observed_own]}
    problem = "b round 1: not logged as contributed, but b is among the members ['a', 'b']"
    assert replica_problems(logs, None) == [problem]
    assert replica_problems(logs, None, killed={"b"}) == []
    liar = {"a": [dict(entry(0, ["b"], "a"), contributed=True)]}
    assert replica_problems(liar, None) == ["a round 0: logged as contributed, but a is not among the members ['b']"]
