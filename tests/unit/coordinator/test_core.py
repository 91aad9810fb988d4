"""CoordinatorCore driven directly (no network) with a fake clock: joins, uploads, round closing, leases,
restarts. Frames are real: built by node.train.worker.Worker or node.wire.pack."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from coordinator.config import parse_run_file
from coordinator.core import PROTOCOL_VERSION, Chunk, CoordinatorCore
from coordinator.errors import (BadPayload, Conflict, Full, NotSubmitted, Refused, ResumeMismatch, StillOpen,
                                TooLarge, Truncated, Unauthorized, UnknownNode, WrongRound)
from coordinator.store import Store
from coordinator.uploads import RESUME_KEY
from node import wire
from node.config import run_config_from_dict
from node.errors import ConfigError
from node.train.reference import Reference
from node.train.worker import Worker
from node.transport.base import RoundResult

BASE: dict[str, dict[str, Any]] = {
    "run": {"id": "core-test", "task": "gpt", "recipe": "sign", "rounds": 10, "seed": 0},
    "task": {"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 1},
    "recipe": {"H": 1},
    "membership": {"min_nodes": 2, "max_nodes": 4, "heartbeat_s": 2.0, "lease_s": 10.0},
    "rounds": {"initial_wait_s": 5.0, "min_wait_s": 1.0, "max_wait_s": 60.0, "quantile": 1.0, "margin": 2.0,
               "eval_every": 0},
}
T0 = 100.0


def run_text(overrides: dict[str, dict[str, Any]] | None = None) -> str:
    lines = []
    for section, values in BASE.items():
        merged = {**values, **(overrides or {}).get(section, {})}
        lines.append(f"[{section}]")
        lines.extend(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in merged.items())
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads on a shared box; restore for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The stdlib corpus cached under this session's temp dir (shared with the other coordinator modules)."""
    cache = tmp_path_factory.getbasetemp() / "lowband-corpus-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBAND_CACHE", str(cache))
        yield


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class Harness:
    """One coordinator core over a state dir, plus helpers that act as its members."""

    def __init__(self, state_dir: Path, clock: Clock, overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.clock = clock
        self.cfg = parse_run_file(run_text(overrides))
        self.store = Store(state_dir)
        try:
            self.core = CoordinatorCore(self.cfg, self.store, clock=clock)
        except BaseException:
            self.store.close()
            raise
        self.info = self.core.run_info(PROTOCOL_VERSION)
        self.ids: dict[str, str] = {}
        self.gen = torch.Generator().manual_seed(1234)

    def join(self, name: str, **kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = dict(name=name, protocol_version=PROTOCOL_VERSION, config_json=self.info["config_json"],
                                    config_hash=self.info["config_hash"],
                                    task_fingerprint=self.info["task_fingerprint"],
                                    digest=self.info["model_digest"], capabilities=("device=cpu",), join_token="")
        args.update(kw)
        out = self.core.join(**args)
        self.ids[name] = out["node_id"]
        return out

    def frame(self, sender: str, round_: int, run: str | None = None) -> bytes:
        ref = self.core.reference
        enc = {s.name: ref.codec.encode(torch.randn(s.shape, generator=self.gen)) for s in ref.spec}
        return wire.pack(run or self.cfg.run.run_id, round_, sender, ref.codec, ref.spec, enc)

    def chunks(self, name: str, round_: int, data: bytes, offset: int = 0, total: int | None = None,
               piece: int = 1 << 20, loss: float = 2.0) -> list[Chunk]:
        total = len(data) if total is None else total
        nid = self.ids.get(name, name)
        return [Chunk(nid, round_, off, total, data[off - offset:off - offset + piece], loss)
                for off in range(offset, offset + max(len(data), 1), piece)]

    def submit(self, name: str, round_: int, frame: bytes | None = None, **kw: Any) -> dict[str, Any]:
        data = self.frame(name, round_) if frame is None else frame
        return self.core.submit(iter(self.chunks(name, round_, data, **kw)))

    def worker(self, name: str, join: dict[str, Any]) -> Worker:
        return Worker(name, self.cfg.run, self.core.task, join["shard"], join["num_shards"])

    def close(self) -> None:
        self.core.close()
        self.store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(tmp_path: Path, clock: Clock) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(overrides: dict[str, dict[str, Any]] | None = None, state: str = "state") -> Harness:
        h = Harness(tmp_path / state, clock, overrides)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


@pytest.fixture
def h(make: Callable[..., Harness]) -> Harness:
    return make()


# -- joining -----------------------------------------------------------------------------------------
def test_join_assigns_ids_shards_and_first_round(h: Harness) -> None:
    a = h.join("a")
    b = h.join("b")
    assert re.fullmatch(r"[0-9a-f]{32}", a["node_id"]) and a["node_id"] != b["node_id"]
    assert (a["shard"], b["shard"]) == (0, 1)
    assert a["num_shards"] == 4
    assert a["first_round"] == b["first_round"] == 0
    assert a["current_round"] == 0 and a["committed_rounds"] == 0
    assert a["lease_ms"] == 10_000 and a["heartbeat_interval_ms"] == 2000
    assert run_config_from_dict(json.loads(a["config_json"])) == h.cfg.run
    # Once a payload of round 0 is in, a joiner starts with the next round.
    h.submit("a", 0)
    c = h.join("c")
    assert c["first_round"] == 1 and c["current_round"] == 0 and c["shard"] == 2
    # Shards are reused: the smallest free slot.
    h.core.leave(b["node_id"], "test")
    assert h.join("d")["shard"] == 1
    assert h.core.members[a["node_id"]].capabilities == ("device=cpu",)


def test_join_same_name_is_a_conflict(h: Harness) -> None:
    h.join("a")
    with pytest.raises(Conflict, match="a live member is already named 'a'"):
        h.join("a")
    # a name that happens to contain "full" is still a conflict, not a full run
    h.join("carefully")
    with pytest.raises(Conflict, match="already named 'carefully'"):
        h.join("carefully")


def test_join_when_full(make: Callable[..., Harness]) -> None:
    h = make({"membership": {"max_nodes": 2}})
    h.join("a")
    h.join("b")
    with pytest.raises(Full, match=re.escape("the run is full (2 members)")):
        h.join("c")


def test_join_with_different_config_is_refused_naming_the_field(h: Harness) -> None:
    theirs = json.loads(h.info["config_json"])
    theirs["recipe"]["H"] = 2
    with pytest.raises(Refused) as info:
        h.join("a", config_json=json.dumps(theirs))
    assert "config differs from the run's (node vs run)" in str(info.value)
    assert "recipe.H: 2 vs 1" in str(info.value)
    theirs["recipe"]["inner"]["lr"] = 1.0
    with pytest.raises(Refused, match=r"recipe\.H: 2 vs 1; recipe\.inner\.lr: 1\.0 vs 0\.0005"):
        h.join("a", config_json=json.dumps(theirs))
    assert h.core.members == {}


@pytest.mark.parametrize("kw, error, pattern", [
    ({"protocol_version": 2}, Refused, "protocol version 2 is not supported; this coordinator speaks 1"),
    ({"task_fingerprint": "0" * 64}, Refused, "task fingerprint differs: node 0000000000000000 vs run "),
    ({"digest": "deadbeefdeadbeef"}, Refused, "model tensors differ: node digest deadbeefdeadbeef vs run "),
    ({"config_json": "", "config_hash": "feedfeedfeedfeed"}, Refused, "config hash differs: node feedfeedfeedfeed"),
    ({"config_json": "{not json"}, Refused, "config_json is not valid JSON"),
    ({"name": ""}, Refused, "node_name must be 1–128 characters"),
    ({"name": "x" * 129}, Refused, "node_name must be 1–128 characters"),
])
def test_join_refusals(h: Harness, kw: dict[str, Any], error: type, pattern: str) -> None:
    with pytest.raises(error, match=re.escape(pattern)) as info:
        h.join(kw.pop("name", "a"), **kw)
    assert info.value.code == "FAILED_PRECONDITION"
    assert h.core.members == {}


def test_join_token(make: Callable[..., Harness]) -> None:
    h = make({"membership": {"join_token": "s3cret"}})
    with pytest.raises(Unauthorized, match="join token missing or wrong for this run") as info:
        h.join("a")
    assert info.value.code == "UNAUTHENTICATED"
    with pytest.raises(Unauthorized):
        h.join("a", join_token="s3cret-not")
    assert h.join("a", join_token="s3cret")["first_round"] == 0


# -- a committed round -------------------------------------------------------------------------------
def test_two_members_commit_and_replicas_match_the_reference(h: Harness, clock: Clock) -> None:
    ja, jb = h.join("a"), h.join("b")
    workers = {"a": h.worker("a", ja), "b": h.worker("b", jb)}
    fp0 = h.core.reference.fingerprint()
    assert all(w.fingerprint() == fp0 for w in workers.values())
    sent_by_a, losses = 0, []
    for r in range(2):
        frames = {}
        for name, w in workers.items():
            stats = w.train()
            frames[name] = w.prepare(r)
            losses.append(stats.mean_loss)
            assert h.submit(name, r, frames[name], loss=stats.mean_loss) \
                == {"round": r, "received_bytes": len(frames[name]), "accepted": True}
            clock.advance(0.5)
        sent_by_a += len(frames["a"])
        assert h.core.open_round == r + 1 and h.core.reference.committed_rounds == r + 1
        result, to_send = h.core.collect(h.ids["a"], r, 0.0, True)
        assert to_send == ["b"]
        assert list(result.frames) == ["a", "b"] and result.frames == frames
        assert result.round == r and result.reason == "all 2 live members submitted"
        _, to_send_b = h.core.collect(h.ids["b"], r, 0.0, True)
        assert to_send_b == ["a"]
        for w in workers.values():
            report = w.apply(RoundResult(r, True, result.frames))
            assert report.committed and report.contributed and report.rejected == {}
        assert result.fingerprint == h.core.reference.fingerprint() != fp0
        assert all(w.fingerprint() == result.fingerprint for w in workers.values())
    assert h.store.latest()[0] == 2
    rows = h.store.recent_rounds()
    assert [r.round for r in rows] == [0, 1] and rows[-1].members == ["a", "b"]
    assert rows[-1].fingerprint == h.core.reference.fingerprint()
    assert rows[-1].mean_loss == pytest.approx(sum(losses[2:]) / 2, rel=1e-6)
    assert rows[-1].bytes_in == sum(len(f) for f in frames.values())
    assert rows[-1].bytes_out == len(frames["a"]) + len(frames["b"])  # each member gets the other's frame
    m = h.core.members[h.ids["a"]]
    assert m.rounds_contributed == 2 and m.bytes_in == sent_by_a
    assert m.last_loss == pytest.approx(losses[2], rel=1e-6)
    # the spread of a fully-attended round feeds the next deadline
    assert list(h.core.spreads) == [0.5, 0.5]


def test_collect_open_round_with_no_wait_is_still_open(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0)
    with pytest.raises(StillOpen, match=re.escape("round 0 is still open: waiting for 1 of 2 members")) as info:
        h.core.collect(h.ids["a"], 0, 0.0, True)
    assert info.value.code == "DEADLINE_EXCEEDED"
    # a member that did not submit may also wait for the round, when it says so
    with pytest.raises(StillOpen):
        h.core.collect(h.ids["b"], 0, 0.0, False)


def test_collect_by_member_without_payload_is_not_submitted(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0)
    with pytest.raises(NotSubmitted, match="no payload from b for round 0 is held") as info:
        h.core.collect(h.ids["b"], 0, 0.0, True)
    assert info.value.metadata == {"lowband-not-submitted": "1"}
    assert info.value.code == "FAILED_PRECONDITION"


def test_collect_round_not_open_yet(h: Harness) -> None:
    h.join("a")
    with pytest.raises(WrongRound, match=re.escape("round 1 is not open yet (the open round is 0)")):
        h.core.collect(h.ids["a"], 1, 0.0, False)


def test_submit_for_closed_or_future_round_is_wrong_round(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0), h.submit("b", 0)
    assert h.core.open_round == 1
    with pytest.raises(WrongRound, match=re.escape("round 0 is closed (the open round is 1)")) as info:
        h.submit("a", 0)
    assert info.value.code == "FAILED_PRECONDITION"
    with pytest.raises(WrongRound, match=re.escape("round 2 is not open yet (the open round is 1)")):
        h.submit("a", 2)


def test_joiner_cannot_submit_before_its_first_round(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0)
    assert h.join("late")["first_round"] == 1
    with pytest.raises(WrongRound, match="late joined for round 1; it cannot contribute to round 0"):
        h.submit("late", 0)
    h.submit("b", 0)  # "late" is not expected for round 0: the round closes without it
    assert h.core.open_round == 1
    h.submit("late", 1)
    assert h.core.status()["submitted"] == ["late"]


def test_unknown_node_everywhere(h: Harness) -> None:
    h.join("a")
    ghost = "f" * 32
    pattern = "unknown node id ffffffff…: never joined, left, or its lease expired; join again"
    for call in (lambda: h.core.submit(iter([Chunk(ghost, 0, 0, 100, b"x" * 100)])),
                 lambda: h.core.heartbeat(ghost),
                 lambda: h.core.collect(ghost, 0, 0.0, False),
                 lambda: h.core.leave(ghost, "bye"),
                 lambda: list(h.core.fetch_state(ghost, 0))):
        with pytest.raises(UnknownNode, match=re.escape(pattern)) as info:
            call()
        assert info.value.code == "NOT_FOUND"


# -- uploads -----------------------------------------------------------------------------------------
def test_oversized_and_empty_uploads(h: Harness) -> None:
    h.join("a")
    limit = h.core.limit
    with pytest.raises(TooLarge, match=f"payload of {limit + 1} bytes exceeds this run's limit of {limit} bytes") as info:
        h.core.submit(iter([Chunk(h.ids["a"], 0, 0, limit + 1, b"x")]))
    assert info.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(BadPayload, match="total_size is 0: an upload must carry a payload"):
        h.core.submit(iter([Chunk(h.ids["a"], 0, 0, 0, b"")]))
    with pytest.raises(BadPayload, match="empty upload stream: send at least one chunk"):
        h.core.submit(iter([]))
    assert h.core.uploads == {} and h.core.submitted == {}


def test_upload_in_several_chunks(h: Harness) -> None:
    h.join("a"), h.join("b")
    frame = h.frame("a", 0)
    assert h.submit("a", 0, frame, piece=4096)["accepted"]
    assert h.core.submitted[h.ids["a"]][0] == frame


def test_truncated_upload_then_resume_completes(h: Harness) -> None:
    h.join("a"), h.join("b")
    frame = h.frame("a", 0)
    head = h.chunks("a", 0, frame[:1000], total=len(frame), piece=300)
    with pytest.raises(Truncated, match=f"stream ended at byte 1000 of {len(frame)}; resume from offset 1000") as info:
        h.core.submit(iter(head))
    assert info.value.metadata == {RESUME_KEY: "1000"}
    assert info.value.code == "DATA_LOSS"
    # an upload in progress counts as submitted for collect (it is not "lost")
    with pytest.raises(StillOpen):
        h.core.collect(h.ids["a"], 0, 0.0, True)
    assert h.submit("a", 0, frame[1000:], offset=1000, total=len(frame)) == \
        {"round": 0, "received_bytes": len(frame), "accepted": True}
    assert h.core.submitted[h.ids["a"]][0] == frame
    h.submit("b", 0)
    result, _ = h.core.collect(h.ids["b"], 0, 0.0, True)
    assert result.frames["a"] == frame


def test_resume_at_wrong_offset_names_the_right_one(h: Harness) -> None:
    h.join("a"), h.join("b")
    frame = h.frame("a", 0)
    with pytest.raises(Truncated):
        h.core.submit(iter(h.chunks("a", 0, frame[:1000], total=len(frame))))
    with pytest.raises(ResumeMismatch, match="chunk offset 1500 but 1000 bytes are held; resume from 1000") as info:
        h.submit("a", 0, frame[1500:], offset=1500, total=len(frame))
    assert info.value.metadata == {RESUME_KEY: "1000"}
    assert info.value.code == "OUT_OF_RANGE"
    # a resume with no upload in progress must start from 0
    with pytest.raises(ResumeMismatch) as info:
        h.submit("b", 0, b"y" * 10, offset=10, total=20)
    assert info.value.metadata == {RESUME_KEY: "0"}
    # the held bytes survive the mismatch: resuming at 1000 completes the upload
    assert h.submit("a", 0, frame[1000:], offset=1000, total=len(frame))["accepted"]


def test_restart_of_an_upload_from_zero_replaces_the_partial_one(h: Harness) -> None:
    h.join("a"), h.join("b")
    with pytest.raises(Truncated):
        h.core.submit(iter(h.chunks("a", 0, b"junk" * 10, total=5000)))
    frame = h.frame("a", 0)
    assert h.submit("a", 0, frame)["accepted"]


def test_chunks_that_do_not_continue_the_upload(h: Harness) -> None:
    h.join("a")
    nid = h.ids["a"]
    with pytest.raises(BadPayload, match=re.escape("chunk for node/round/total (0, 999) differs from the upload's "
                                                   "first chunk (0, 1000)")):
        h.core.submit(iter([Chunk(nid, 0, 0, 1000, b"x" * 10), Chunk(nid, 0, 10, 999, b"x" * 10)]))
    with pytest.raises(BadPayload, match="chunks carry more than the declared total_size 20"):
        h.core.submit(iter([Chunk(nid, 0, 0, 20, b"x" * 15), Chunk(nid, 0, 15, 20, b"x" * 15)]))


@pytest.mark.parametrize("case, pattern", [
    ("garbage", r"payload rejected: payload does not start with the lowband magic b'LBW1'"),
    ("corrupt", r"payload rejected: payload digest mismatch \(truncated or corrupted in transit\)"),
    ("wrong_round", r"payload rejected: payload is for round 1, expected round 0"),
    ("wrong_run", r"payload rejected: payload is for run 'other-run', this run is 'core-test'"),
    ("other_sender", r"payload names sender 'b' but node 'a' sent it"),
])
def test_bad_payloads_are_rejected_and_the_member_can_still_submit(h: Harness, case: str, pattern: str) -> None:
    h.join("a"), h.join("b")
    good = h.frame("a", 0)
    bad = {"garbage": bytes(torch.randint(0, 256, (2000,), generator=h.gen, dtype=torch.uint8).tolist()),
           "corrupt": good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],
           "wrong_round": h.frame("a", 1),
           "wrong_run": h.frame("a", 0, run="other-run"),
           "other_sender": h.frame("b", 0)}[case]
    with pytest.raises(BadPayload, match=pattern) as info:
        h.submit("a", 0, bad)
    assert info.value.code == "INVALID_ARGUMENT"
    assert h.core.submitted == {} and h.core.uploads == {} and h.core.deadline is None
    with pytest.raises(NotSubmitted):
        h.core.collect(h.ids["a"], 0, 0.0, True)
    h.submit("a", 0, good)
    h.submit("b", 0)
    assert h.core.open_round == 1
    result, _ = h.core.collect(h.ids["a"], 0, 0.0, True)
    assert result.frames["a"] == good


def test_resubmitting_the_same_payload_is_idempotent_a_different_one_conflicts(h: Harness) -> None:
    h.join("a"), h.join("b")
    frame = h.frame("a", 0)
    assert h.submit("a", 0, frame)["accepted"]
    assert h.submit("a", 0, frame) == {"round": 0, "received_bytes": len(frame), "accepted": True}
    with pytest.raises(Conflict, match="a different payload for round 0 was already accepted"):
        h.submit("a", 0, frame + b"x")
    same_size = bytearray(frame)
    same_size[len(frame) // 2] ^= 0xFF
    with pytest.raises(Conflict, match="a different payload for round 0 was already accepted"):
        h.submit("a", 0, bytes(same_size))
    assert h.core.open_round == 0 and h.core.submitted[h.ids["a"]][0] == frame


# -- deadlines and leases ----------------------------------------------------------------------------
def test_deadline_commits_with_the_payloads_that_arrived(h: Harness, clock: Clock) -> None:
    for n in "abc":
        h.join(n)
    h.submit("a", 0)
    assert h.core.deadline == T0 + 5.0  # no history: initial_wait_s
    assert h.core.deadline_reason == "no history: initial wait 5.0 s"
    clock.advance(1.0)
    h.submit("b", 0)
    assert h.core.deadline == T0 + 5.0  # set by the first payload only
    clock.advance(3.9)
    h.core.tick()
    assert h.core.open_round == 0
    assert h.core.status()["deadline_in_s"] == pytest.approx(0.1)
    clock.advance(0.1)
    h.core.tick()
    assert h.core.open_round == 1
    row = h.store.recent_rounds()[-1]
    assert row.members == ["a", "b"]
    assert row.reason == "deadline passed with 2/3 payloads (≥ min_nodes 2); missing 1"
    assert row.duration_s == pytest.approx(5.0)
    assert list(h.core.spreads) == []  # a round cut by its deadline says nothing about the spread
    assert h.core.deadline is None and h.core.status()["deadline_in_s"] == -1.0
    result, to_send = h.core.collect(h.ids["c"], 0, 0.0, False)  # the straggler collects the others
    assert to_send == ["a", "b"] and result.reason == row.reason


def test_deadline_below_quorum_waits_for_quorum(h: Harness, clock: Clock) -> None:
    for n in "abc":
        h.join(n)
    h.submit("a", 0)
    clock.advance(6.0)
    h.core.tick()
    assert h.core.open_round == 0
    with pytest.raises(StillOpen, match="deadline passed but only 1 < min_nodes 2 payloads: waiting for quorum"):
        h.core.collect(h.ids["a"], 0, 0.0, True)
    h.submit("b", 0)  # quorum reached after the deadline: closes at once
    assert h.core.open_round == 1
    assert h.store.recent_rounds()[-1].reason == "deadline passed with 2/3 payloads (≥ min_nodes 2); missing 1"


def test_deadline_adapts_to_the_observed_spread(h: Harness, clock: Clock) -> None:
    for n in "ab":
        h.join(n)
    h.submit("a", 0)
    clock.advance(3.0)
    h.submit("b", 0)  # spread 3 s
    assert list(h.core.spreads) == [3.0]
    clock.advance(10.0)
    h.submit("a", 1)
    # quantile 1.0 × margin 2 of [3 s] = 6 s
    assert h.core.deadline == pytest.approx(clock.t + 6.0)
    assert h.core.deadline_reason == "q1.00 of 1 spreads = 3.00 s × 2.0 → 6.00 s (bounds 1.0–60.0 s)"


def test_lease_expiry_by_tick_removes_a_silent_member(h: Harness, clock: Clock) -> None:
    for n in "abc":
        h.join(n)
    clock.advance(10.0)
    h.core.heartbeat(h.ids["a"])
    h.core.heartbeat(h.ids["b"])
    h.core.tick()
    assert len(h.core.members) == 3  # silent exactly lease_s: still a member
    clock.advance(0.5)
    h.core.tick()
    assert {m.name for m in h.core.members.values()} == {"a", "b"}
    assert {m.name for m in h.store.load_members(now=0.0).values()} == {"a", "b"}
    with pytest.raises(UnknownNode):
        h.core.heartbeat(h.ids["c"])
    assert h.core.heartbeat(h.ids["a"]) == {"current_round": 0, "committed_rounds": 0, "lease_ms": 10_000}


def test_lease_expiry_can_close_a_round(h: Harness, clock: Clock) -> None:
    for n in "abc":
        h.join(n)
    h.submit("a", 0)
    h.submit("b", 0)
    clock.advance(4.9)  # before the 5 s deadline: c is awaited
    h.core.tick()
    assert h.core.open_round == 0
    clock.advance(5.6)  # c silent 10.5 s > lease; a and b renewed just now
    h.core.heartbeat(h.ids["a"]), h.core.heartbeat(h.ids["b"])
    h.core.tick()
    assert h.core.open_round == 1 and h.ids["c"] not in h.core.members
    row = h.store.recent_rounds()[-1]
    assert row.members == ["a", "b"] and row.reason == "all 2 live members submitted"


def test_leave_is_immediate_and_can_close_a_round(h: Harness) -> None:
    for n in "abc":
        h.join(n)
    h.submit("a", 0)
    h.submit("b", 0)
    assert h.core.open_round == 0
    h.core.leave(h.ids["c"], "shutting down")
    assert h.ids["c"] not in h.core.members
    assert h.core.open_round == 1
    row = h.store.recent_rounds()[-1]
    assert row.members == ["a", "b"] and row.reason == "all 2 live members submitted"
    with pytest.raises(UnknownNode):
        h.core.leave(h.ids["c"], "again")


def test_leave_drops_a_partial_upload(h: Harness) -> None:
    h.join("a"), h.join("b")
    with pytest.raises(Truncated):
        h.core.submit(iter(h.chunks("a", 0, b"z" * 100, total=1000)))
    h.core.leave(h.ids["a"], "bye")
    assert h.core.uploads == {}


@pytest.mark.parametrize("how", ["leave", "lease"])
def test_payload_of_a_member_gone_before_commit_still_counts(h: Harness, clock: Clock, how: str) -> None:
    for n in "abc":
        h.join(n)
    fa = h.frame("a", 0)
    h.submit("a", 0, fa)
    if how == "leave":
        h.core.leave(h.ids["a"], "bye")
    else:
        clock.advance(4.0)
        h.core.heartbeat(h.ids["b"]), h.core.heartbeat(h.ids["c"])
        h.submit("b", 0)
        clock.advance(6.5)  # a silent 10.5 s, b and c 6.5 s; the 5 s deadline passed with 2 ≥ min_nodes
        h.core.heartbeat(h.ids["b"]), h.core.heartbeat(h.ids["c"])
        h.core.tick()
    assert h.ids["a"] not in h.core.members
    if how == "leave":
        h.submit("b", 0)
        assert h.core.open_round == 0
        h.submit("c", 0)
    assert h.core.open_round == 1
    result, to_send = h.core.collect(h.ids["b"], 0, 0.0, True)
    want = ["a", "b", "c"] if how == "leave" else ["a", "b"]
    assert list(result.frames) == want and result.frames["a"] == fa and to_send == [n for n in want if n != "b"]
    assert h.store.recent_rounds()[-1].members == want


def test_the_first_node_up_does_not_commit_round_0_alone(h: Harness, clock: Clock) -> None:
    h.join("a")
    h.submit("a", 0)
    clock.advance(30.0)
    h.core.heartbeat(h.ids["a"])
    h.core.tick()
    assert h.core.open_round == 0  # min_nodes 2: the run has not started
    assert h.join("b")["first_round"] == 0  # so a late starter still enters round 0
    h.submit("b", 0)
    assert h.core.open_round == 1 and h.store.recent_rounds()[-1].members == ["a", "b"]


# -- state, status, restart --------------------------------------------------------------------------
def test_fetch_state_is_the_reference_and_resumes_by_offset(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0), h.submit("b", 0)
    parts = list(h.core.fetch_state(h.ids["a"], 0))
    blob = b"".join(p["data"] for p in parts)
    assert {p["committed_rounds"] for p in parts} == {1} and parts[0]["total_size"] == len(blob)
    assert parts[0]["reference_fingerprint"] == h.core.reference.fingerprint()
    model = h.core.task.build_model(h.cfg.run.seed)
    fresh = Reference(h.cfg.run, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    fresh.load_bytes(blob)
    assert fresh.fingerprint() == h.core.reference.fingerprint() and fresh.committed_rounds == 1
    tail = list(h.core.fetch_state(h.ids["a"], 100))
    assert tail[0]["offset"] == 100 and b"".join(p["data"] for p in tail) == blob[100:]
    with pytest.raises(WrongRound, match=f"offset {len(blob) + 1} is past the end of the {len(blob)}-byte state"):
        list(h.core.fetch_state(h.ids["a"], len(blob) + 1))


def test_status_reports_members_rounds_and_submissions(h: Harness, clock: Clock) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0, loss=3.0), h.submit("b", 0, loss=1.0)
    clock.advance(1.0)
    h.submit("b", 1)
    s = h.core.status()
    assert s["run_id"] == "core-test" and s["recipe"] == "sign"
    assert s["current_round"] == 1 and s["committed_rounds"] == 1
    assert s["submitted"] == ["b"]
    # round 0's spread was 0 s: × margin, clamped up to min_wait_s = 1 s after b's payload at T0 + 1
    assert s["deadline_in_s"] == pytest.approx(1.0)
    assert sorted(m.name for m in s["members"]) == ["a", "b"]
    assert [r.round for r in s["recent"]] == [0] and s["recent"][0].mean_loss == pytest.approx(2.0)
    assert s["reference_fingerprint"] == h.core.reference.fingerprint()


def test_restart_resumes_rounds_fingerprint_and_members(make: Callable[..., Harness], clock: Clock) -> None:
    h1 = make()
    ja, jb = h1.join("a"), h1.join("b")
    h1.submit("a", 0), h1.submit("b", 0)
    h1.submit("a", 1)  # accepted but held only in memory
    fp, ids, spreads = h1.core.reference.fingerprint(), dict(h1.ids), list(h1.core.spreads)
    assert len(spreads) == 1
    h1.close()
    clock.advance(100.0)  # far past every lease: a restart must not expel everyone
    h2 = make()
    assert h2.core.reference.committed_rounds == 1 and h2.core.open_round == 1
    assert h2.core.reference.fingerprint() == fp
    assert list(h2.core.spreads) == pytest.approx(spreads)  # the adaptive deadline keeps its history
    assert {nid: (m.name, m.shard) for nid, m in h2.core.members.items()} == \
        {ja["node_id"]: ("a", 0), jb["node_id"]: ("b", 1)}
    assert all(m.last_heartbeat == clock.t and m.rounds_contributed == 1 for m in h2.core.members.values())
    h2.core.tick()
    assert len(h2.core.members) == 2
    # the last result is served from disk; the lost payload of round 1 must be resubmitted
    result, to_send = h2.core.collect(ids["a"], 0, 0.0, True)
    assert result.reason == "restored" and list(result.frames) == ["a", "b"] and to_send == ["b"]
    with pytest.raises(NotSubmitted, match="no payload from a for round 1 is held"):
        h2.core.collect(ids["a"], 1, 0.0, True)
    h2.ids = ids
    h2.submit("a", 1), h2.submit("b", 1)
    assert h2.core.reference.committed_rounds == 2


@pytest.mark.parametrize("overrides, what", [
    ({"recipe": {"H": 2}}, "config hash"),
    ({"run": {"id": "another-run"}}, "run 'another-run'"),
])
def test_a_different_run_file_on_the_same_state_dir_is_refused(make: Callable[..., Harness],
                                                               overrides: dict, what: str) -> None:
    make().close()
    with pytest.raises(ConfigError, match="Use another --state-dir") as info:
        make(overrides)
    assert what in str(info.value)
    # the same run with more rounds is the same math: allowed
    make({"run": {"rounds": 20}})


@pytest.mark.parametrize("codec", ["identity", "bf16"])
def test_aggregate_mode_sends_one_frame_and_replicas_match(tmp_path: Path, clock: Clock, codec: str) -> None:
    """result = "aggregate": the coordinator reduces, applies the decoded aggregate, and every member applying
    the same frame lands on the coordinator's fingerprint."""
    h = Harness(tmp_path / "state", clock, {"rounds": {"result": "aggregate", "aggregate_codec": codec}})
    try:
        ja, jb = h.join("a"), h.join("b")
        workers = {"a": h.worker("a", ja), "b": h.worker("b", jb)}
        for r in range(2):
            for name, w in workers.items():
                w.train()
                h.submit(name, r, w.prepare(r))
            result, to_send = h.core.collect(h.ids["a"], r, 0.0, True)
            assert to_send == [] and result.aggregate is not None
            for w in workers.values():
                report = w.apply(RoundResult(r, True, aggregate=result.aggregate, aggregate_codec=codec,
                                             aggregate_members=tuple(result.frames)))
                assert report.committed and report.contributed and report.members == ("a", "b")
            assert all(w.fingerprint() == h.core.reference.fingerprint() == result.fingerprint
                       for w in workers.values())
        assert h.store.aggregate(1) == result.aggregate
        bad = bytearray(result.aggregate)
        bad[-1] ^= 1
        w = workers["a"]
        w.train()
        w.prepare(2)
        report = w.apply(RoundResult(2, True, aggregate=bytes(bad), aggregate_codec=codec, aggregate_members=("a",)))
        assert not report.committed and "digest mismatch" in report.rejected["coordinator"]
    finally:
        h.close()
