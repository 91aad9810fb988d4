"""The coordinator's run file (TOML → RunFile) and its crash-safe store (SQLite + renamed blobs)."""
from __future__ import annotations

import math
from pathlib import Path

import msgpack
import pytest

from coordinator.store import Store, WalError, record_pieces
from node.membership import DeadlinePolicy, Member, MembershipPolicy
from node.roundlog import RoundRow
from node.runfile import RunFile, load_run_file, parse_run_file
from node.fsutil import write_atomic
from node.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


# -- run file ----------------------------------------------------------------------------------------
def test_defaults_of_an_empty_run_file() -> None:
    cfg = parse_run_file("")
    run = cfg.run
    assert run.run_id == "lowband" and run.rounds == 100 and run.seed == 0 and run.workers == 1
    assert run.recipe.name == "sign"
    assert run.task.name == "gpt" and run.task.params == {"size": "tiny", "batch_size": 8}
    assert cfg.membership == MembershipPolicy()
    assert cfg.deadline == DeadlinePolicy()
    assert cfg.eval_every == 1 and cfg.keep_results == 8


def test_full_run_file_sections() -> None:
    cfg = parse_run_file("""
        [run]
        id = "r1"
        task = "gpt"
        recipe = "diloco"
        rounds = 7
        seed = 3
        [task]
        size = "small"
        batch_size = 4
        [membership]
        min_nodes = 2
        max_nodes = 5
        heartbeat_s = 1.0
        lease_s = 4.0
        join_token = "tok"
        [rounds]
        initial_wait_s = 9.0
        min_wait_s = 1.0
        max_wait_s = 50.0
        quantile = 0.5
        margin = 1.5
        history = 4
        eval_every = 3
        keep_results = 2
    """)
    assert (cfg.run.run_id, cfg.run.recipe.name, cfg.run.rounds, cfg.run.seed) == ("r1", "diloco", 7, 3)
    assert cfg.run.task.params == {"size": "small", "batch_size": 4}
    assert cfg.membership == MembershipPolicy(2, 5, 1.0, 4.0, "tok")
    assert cfg.deadline == DeadlinePolicy(9.0, 1.0, 50.0, 0.5, 1.5, 4)
    assert cfg.eval_every == 3 and cfg.keep_results == 2


def test_recipe_overrides_nested_and_flat_are_equivalent() -> None:
    nested = parse_run_file("""
        [recipe]
        H = 4
        [recipe.inner]
        lr = 1e-3
        warmup_steps = 5
        [recipe.codec]
        block = 64
    """)
    flat = parse_run_file("""
        [recipe]
        H = 4
        "inner.lr" = 1e-3
        "inner.warmup_steps" = 5
        "codec.block" = 64
    """)
    for cfg in (nested, flat):
        r = cfg.run.recipe
        assert r.H == 4 and r.inner.lr == 1e-3 and r.inner.warmup_steps == 5
        assert r.codec.params["block"] == 64
    assert nested.run.to_dict() == flat.run.to_dict()
    assert nested.run.config_hash("fp") == flat.run.config_hash("fp")


def test_the_shipped_sign_run_file_loads() -> None:
    cfg = load_run_file(REPO / "deploy" / "runs" / "sign.toml")
    assert cfg.run.run_id == "sign-demo" and cfg.run.recipe.name == "sign"
    assert cfg.run.recipe.H == 16 and cfg.run.recipe.inner.lr == 2e-3
    assert cfg.membership.min_nodes == 2 and cfg.deadline.max_wait_s == 120.0


def test_missing_run_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read run file .*nope.toml"):
        load_run_file(tmp_path / "nope.toml")


@pytest.mark.parametrize("text, pattern", [
    ("[run\nid = 1", r"^r\.toml: not valid TOML: "),
    ("[runs]\nid = 'x'", r"^r\.toml: unknown section \[runs\]; valid sections: \[run\], \[task\], \[recipe\], \[membership\], "
                        r"\[rounds\], \[dht\], \[authority\]$"),
    ("[reduce]\nbound = 'clip'", r"^r\.toml: unknown section \[reduce\]; .*go under the recipe: \[recipe\.reduce\]$"),
    ("[run]\nid = 'x'\nepochs = 3", r"^r\.toml: unknown \[run\] key\(s\) 'epochs'; valid keys: id, recipe, rounds, seed, task$"),
    ("[run]\nrounds = 'many'", r"^r\.toml: run\.rounds must be an integer, got 'many'"),
    ("[rounds]\neval_every = 'often'", r"^r\.toml: rounds\.eval_every must be an integer, got 'often'"),
    ("[rounds]\neval_every = -1", r"rounds\.eval_every must be ≥ 0"),
    ("[rounds]\nkeep_results = 0", r"rounds\.keep_results must be ≥ 1, got 0"),
    ("[membership]\nmin_nodes = 0", r"membership\.min_nodes must be ≥ 1, got 0"),
    ("[membership]\nmin_nodes = 4\nmax_nodes = 3", r"membership\.max_nodes \(3\) must be ≥ min_nodes \(4\)"),
    ("[membership]\nheartbeat_s = 10.0\nlease_s = 10.0", r"membership: need 0 < heartbeat_s \(10\.0\) < lease_s \(10\.0\)"),
    ("[membership]\nquorum = 3", r"^r\.toml: unknown \[membership\] key 'quorum'; valid keys: heartbeat_s, idle_rounds, idle_s, "
                                 r"join_token, lease_s, max_nodes, min_nodes, read_token$"),
    ("[membership]\nlease_s = 'long'", r"^r\.toml: \[membership\] lease_s must be float, got 'long'$"),
    ("[rounds]\nquantile = 1.5", r"rounds\.quantile must be in \(0, 1\], got 1\.5"),
    ("[rounds]\nmargin = 0.5", r"rounds\.margin must be ≥ 1, got 0\.5"),
    ("[rounds]\nmin_wait_s = 10.0\nmax_wait_s = 5.0", r"rounds: need 0 < min_wait_s \(10\.0\) ≤ max_wait_s \(5\.0\)"),
    ("[rounds]\nhistory = 0", r"rounds\.history must be ≥ 1, got 0"),
    ("[rounds]\npatience = 3", r"^r\.toml: unknown \[rounds\] key 'patience'; valid keys: aggregate_codec, eval_every, history, "
                               r"initial_wait_s, keep_results, margin, max_wait_s, min_wait_s, newcomer_fraction, quantile, "
                               r"result, snapshot_every$"),
    ("[run]\nrecipe = 'nope'", r"unknown recipe 'nope'"),
    ("[recipe]\nH = 0", r"H must be an integer ≥ 1, got 0"),
    ("[recipe]\n'inner.nonsense' = 1", r"unknown setting 'inner\.nonsense'"),
])
def test_bad_run_files_raise_config_error_naming_the_problem(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_run_file(text, "r.toml")


def test_faithful_dct_is_refused_pointing_to_dct_consistent() -> None:
    with pytest.raises(ConfigError) as info:
        parse_run_file("[run]\nrecipe = 'dct'")
    msg = str(info.value)
    assert "recipe 'dct'" in msg and "drift" in msg and "use 'dct-consistent'" in msg
    assert parse_run_file("[run]\nrecipe = 'dct-consistent'").run.recipe.name == "dct-consistent"


def test_coordinator_config_is_frozen() -> None:
    cfg = parse_run_file("")
    assert isinstance(cfg, RunFile)
    with pytest.raises(AttributeError):
        cfg.eval_every = 5  # type: ignore[misc]


# -- store -------------------------------------------------------------------------------------------
def row(r: int, **kw: object) -> RoundRow:
    base = dict(round=r, committed_at=1000.0 + r, members=["a", "b"], reason="all 2 live members submitted",
                fingerprint=f"fp{r}", bytes_in=10 * (r + 1), bytes_out=0, duration_s=0.5, mean_loss=2.5,
                val_loss=float("nan"))
    base.update(kw)
    return RoundRow(**base)  # type: ignore[arg-type]


def mem(node_id: str, name: str, shard: int, hb: float = 5.0, key: bytes | None = None) -> Member:
    return Member(node_id, name, first_round=1, shard=shard, joined_at=123.0, last_heartbeat=hb,
                  capabilities=("device=cpu",), rounds_contributed=4, bytes_in=11, bytes_out=22,
                  public_key=bytes([len(name)]) * 32 if key is None else key)


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "state")
    yield s
    s.close()


def test_identity_recorded_then_mismatch_message(store: Store, tmp_path: Path) -> None:
    assert store.check_identity("run-1", "hash-a") is None
    assert store.check_identity("run-1", "hash-a") is None  # a restart with the same run file
    assert store.info() == {"run_id": "run-1", "config_hash": "hash-a"}
    msg = store.check_identity("run-1", "hash-b")
    assert msg is not None
    assert "holds run 'run-1' with config hash hash-a" in msg
    assert "this run file is run 'run-1' with config hash hash-b" in msg
    assert "Use another --state-dir" in msg
    msg = store.check_identity("run-2", "hash-a")
    assert msg is not None and "run 'run-2'" in msg


def test_a_changed_run_file_is_refused_naming_the_settings_that_differ(store: Store) -> None:
    """The state dir records the run's settings with its hash: a restart with another seed (or any setting) is
    refused with a message that names it; a dir recorded before the settings were is refused by hash alone, and
    records them at its next accepted start."""
    config = {"run_id": "run-1", "seed": 0, "recipe": {"name": "sign", "H": 12}}
    assert store.check_identity("run-1", "hash-a", config=config) is None
    msg = store.check_identity("run-1", "hash-b", config={**config, "seed": 1, "recipe": {"name": "sign", "H": 4}})
    assert msg is not None and "Differences (state dir vs run file): recipe.H: 12 vs 4; seed: 0 vs 1." in msg
    assert "Use another --state-dir" in msg


def test_a_state_dir_from_before_the_settings_were_recorded_records_them(tmp_path: Path) -> None:
    old = Store(tmp_path / "old")
    try:
        assert old.check_identity("run-1", "hash-a") is None  # as before: hashes only
        msg = old.check_identity("run-1", "hash-b", config={"seed": 1})
        assert msg is not None and "Differences" not in msg
        assert old.check_identity("run-1", "hash-a", config={"seed": 0}) is None
        assert "Differences (state dir vs run file): seed: 0 vs 1." in old.check_identity("run-1", "hash-b",
                                                                                            config={"seed": 1})
    finally:
        old.close()


def test_a_state_dir_recorded_with_the_protocol_2_hash_is_the_same_run(store: Store) -> None:
    """The config hash moved to canonical JSON in protocol 3: a state dir that recorded the same run's older hash
    is taken, and re-recorded with the new one; another run's older hash is still refused."""
    assert store.check_identity("run-1", "old-hash") is None
    assert store.check_identity("run-1", "new-hash", legacy_hash="other-old") is not None
    assert store.check_identity("run-1", "new-hash", legacy_hash="old-hash") is None
    assert store.info() == {"run_id": "run-1", "config_hash": "new-hash"}
    assert store.check_identity("run-1", "new-hash") is None


def test_new_store_has_no_rounds(store: Store) -> None:
    assert store.last_round() is None and store.latest_snapshot() == (0, None)
    assert store.result(0) is None
    assert store.recent_rounds() == []


def test_commit_round_then_record_result_and_fingerprint(store: Store) -> None:
    """The commit point records the round without its fingerprint (the state after it is stepped after the commit
    point); ``set_fingerprint`` fills it in, with the audit line."""
    frames = {"a": b"\x00frame-a", "b": b"frame-b\xff"}
    members = {"n1": mem("n1", "a", 0)}
    store.commit_round(row(0, fingerprint=""), frames, members, keys={"a": b"k" * 32})
    assert store.last_round() == 0 and store.fingerprints(0) == {0: ""}
    assert store.result(0) == frames and store.result_keys(0) == {"a": b"k" * 32}
    assert store.record(0)["applied"] == {"result": "relay"}
    store.set_fingerprint(row(0))
    store.commit_round(row(1), {"a": b"x"}, members, aggregate=b"agg", applied={"result": "aggregate", "codec": "bf16"})
    assert store.last_round() == 1 and store.aggregate(1) == b"agg"
    assert store.result(1) == {"a": b"x"}
    recent = store.recent_rounds()
    assert [r.round for r in recent] == [0, 1]
    assert recent[0].members == ["a", "b"] and recent[0].fingerprint == "fp0" and recent[0].bytes_in == 10
    assert math.isnan(recent[0].val_loss)
    store.set_val_loss(0, 1.25)
    assert store.recent_rounds()[0].val_loss == 1.25
    assert [r.round for r in store.recent_rounds(limit=1)] == [1]


def test_the_record_is_written_piece_by_piece_as_the_one_msgpack_document_readers_parse(store: Store) -> None:
    """The write-ahead record is streamed frame by frame (no second copy of a round's frames in memory), and its bytes
    are exactly ``msgpack.packb`` of the record: the format readers (and records written before) use."""
    frames = {f"m{i:03d}": bytes([i]) * (1000 + 37 * i) for i in range(40)}
    record = {"round": 3, "frames": frames, "aggregate": b"agg" * 50, "keys": {"m000": b"k" * 32},
              "applied": {"result": "aggregate", "codec": "bf16"}, "sha256": "ab" * 32}
    pieces = list(record_pieces(record))
    assert len(pieces) > 2 * len(frames)
    assert b"".join(pieces) == msgpack.packb(record, use_bin_type=True)
    store.commit_round(row(3), frames, {}, aggregate=b"agg", applied={"result": "aggregate", "codec": "bf16"})
    assert store.result(3) == frames and store.aggregate(3) == b"agg"


def test_a_damaged_write_ahead_record_is_refused_by_its_checksum(store: Store) -> None:
    store.commit_round(row(0), {"a": b"frame-a"}, {})
    path = store.dir / "result-00000000.msgpack"
    blob = bytearray(path.read_bytes())
    blob[blob.index(b"frame-a")] ^= 1  # one flipped bit in a frame
    path.write_bytes(bytes(blob))
    with pytest.raises(WalError, match="does not match its checksum"):
        store.record(0)
    path.write_bytes(bytes(blob[:len(blob) // 2]))  # torn
    with pytest.raises(WalError, match="is damaged"):
        store.record(0)


def test_records_are_kept_back_to_the_newest_snapshot_and_older_snapshots_pruned(tmp_path: Path) -> None:
    s = Store(tmp_path / "st", keep=2)
    try:
        for r in range(5):
            s.commit_round(row(r), {"a": bytes([r])}, {})
            s.flush()
        # no snapshot: every record is kept (the replay starts from the seeded model)
        assert sorted(p.name for p in s.dir.glob("result-*.msgpack")) == [f"result-{r:08d}.msgpack" for r in range(5)]
        write_atomic(s.snapshot_path(2), b"snapshot-2")
        write_atomic(s.dir / "state-00000001.pt", b"old-format-1")
        write_atomic(s.snapshot_path(4), b"snapshot-4")
        s.flush()
        assert sorted(p.name for p in s.dir.glob("snapshot-*")) == ["snapshot-00000004.safetensors"]
        assert list(s.dir.glob("state-*.pt")) == []
        # rounds 2 and 3 are kept for late collectors (keep=2), round 4 for the replay
        assert sorted(p.name for p in s.dir.glob("result-*.msgpack")) == [f"result-{r:08d}.msgpack" for r in (3, 4)]
        assert s.latest_snapshot() == (4, s.snapshot_path(4))
        assert len(s.recent_rounds()) == 5  # metadata of every round stays in SQLite
    finally:
        s.close()


def test_members_save_and_load_restart_leases(store: Store) -> None:
    members = {"n1": mem("n1", "alice", 0, hb=5.0), "n2": mem("n2", "bob", 3, hb=6.0)}
    store.save_members(members)
    loaded = store.load_members(now=777.0)
    assert set(loaded) == {"n1", "n2"}
    for nid, m in loaded.items():
        want = members[nid]
        assert (m.name, m.first_round, m.shard, m.joined_at, m.capabilities, m.rounds_contributed,
                m.bytes_in, m.bytes_out, m.public_key) == (want.name, want.first_round, want.shard, want.joined_at,
                                                           want.capabilities, want.rounds_contributed, want.bytes_in,
                                                           want.bytes_out, want.public_key)
        assert m.last_heartbeat == 777.0  # the lease restarts: a restart must not expel everyone
    store.save_members({"n2": members["n2"]})
    assert set(store.load_members(now=0.0)) == {"n2"}
    # a member saved without a key (a state dir from before protocol 2) is not loaded: it joins again
    store.save_members({"n3": mem("n3", "carol", 1, key=b"")})
    assert store.load_members(now=0.0) == {}


def test_commit_round_saves_members_atomically(store: Store) -> None:
    store.commit_round(row(0), {}, {"n9": mem("n9", "zed", 1)})
    assert [m.name for m in store.load_members(now=1.0).values()] == ["zed"]


def test_leftovers_of_a_crash_are_cut_at_start(store: Store) -> None:
    store.commit_round(row(0), {"a": b"f"}, {})
    # A crash mid-write of round 1: temporary files exist, nothing was renamed or recorded.
    (store.dir / "snapshot-00000002.safetensors.tmp").write_bytes(b"half-written")
    (store.dir / "result-00000001.msgpack.tmp").write_bytes(b"\x93")
    assert store.result(1) is None
    # A crash after round 1's record was renamed but before the SQLite transaction: not a committed round.
    write_atomic(store.dir / "result-00000001.msgpack", b"renamed-but-unrecorded")
    write_atomic(store.dir / "state-00000002.pt", b"old-format-renamed-but-unrecorded")
    assert store.latest_snapshot() == (0, None)
    assert store.cut_tail() == [1]
    assert sorted(p.name for p in store.dir.iterdir() if p.name.startswith(("result", "snapshot", "state"))) == [
        "result-00000000.msgpack"]
    store.commit_round(row(1), {"a": b"g"}, {})
    assert store.result(1) == {"a": b"g"}


def test_write_atomic_replaces_and_leaves_no_tmp(tmp_path: Path) -> None:
    p = tmp_path / "blob.bin"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two"
    assert list(tmp_path.glob("*.tmp")) == []


def test_reopened_store_sees_committed_rounds(tmp_path: Path) -> None:
    d = tmp_path / "state"
    s = Store(d)
    assert s.check_identity("run", "h") is None
    s.commit_round(row(0), {"a": b"1"}, {"n1": mem("n1", "a", 0)})
    s.commit_round(row(1, mean_loss=float("nan")), {"a": b"2", "b": b"3"},
                   {"n1": mem("n1", "a", 0), "n2": mem("n2", "b", 1)})
    s.close()
    s2 = Store(d)
    try:
        assert s2.check_identity("run", "h") is None
        assert s2.last_round() == 1
        assert s2.result(1) == {"a": b"2", "b": b"3"}
        recent = s2.recent_rounds()
        assert [r.round for r in recent] == [0, 1]
        # NaN ("not measured") survives SQLite, which stores it as NULL: never None, never 0.0
        assert recent[0].mean_loss == 2.5 and math.isnan(recent[1].mean_loss) and math.isnan(recent[1].val_loss)
        assert {m.name for m in s2.load_members(now=0.0).values()} == {"a", "b"}
    finally:
        s2.close()
