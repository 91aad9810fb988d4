"""Who may write what in a serverless run, without a DHT: the record validator on hivemind's interface
(node/transport/dht_signing.py) over ``DHTRecord`` values as hivemind builds them, member records and grants
(node/transport/dht_trust.py), and the run authority's files (node/transport/dht_authority.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import msgpack
import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from node.errors import ConfigError
from node.identity import NodeKey
from node.runfile import parse_run_file
from node.transport.dht_authority import GRANT_FILE, check_grant, grant_text, load_grant, sign_run_text, signed_record
from node.transport.dht_signing import (MAX_RECORD_BYTES, MAX_TTL_S, SignedRecordValidator, envelope, key_id,
                                        parse_envelope)
from node.transport.dht_trust import (Member, Rejections, RunAuthority, RunTrust, key_kind, make_grant, name_problem,
                                      pack_record)

RUN = "trust-run"


def record(writer: NodeKey, value: bytes, key: str = f"{RUN}/peers", expiration: float | None = None,
           subkey: bytes | None = None) -> DHTRecord:
    """A record as hivemind hands it to a validator: key id, msgpack'd subkey and value."""
    return DHTRecord(key_id(key), MSGPackSerializer.dumps(writer.public if subkey is None else subkey),
                     MSGPackSerializer.dumps(value), get_dht_time() + 30 if expiration is None else expiration)


def test_a_peer_signs_its_own_records_and_every_reader_checks_them() -> None:
    alice, mallory = NodeKey.generate(), NodeKey.generate()
    signer = SignedRecordValidator(alice, RUN)
    reader = SignedRecordValidator()  # a bootstrap peer: validates, never signs
    try:
        plain = record(alice, b"hello")
        stored = signer.sign_value(plain)
        signed = DHTRecord(plain.key, plain.subkey, stored, plain.expiration_time)
        assert reader.validate(signed) and signer.validate(signed)
        assert reader.strip_value(signed) == plain.value  # the application reads its own bytes back
        parsed = parse_envelope(stored)
        assert isinstance(parsed, tuple) and parsed[0] == RUN

        # alice's DHT will not sign in mallory's name: the record stays unsigned and no reader takes it
        theirs = record(mallory, b"in mallory's name")
        assert signer.sign_value(theirs) == theirs.value and not reader.validate(theirs)
        # mallory signs a record under alice's key (the subkey names alice): the signature is not alice's
        forged = DHTRecord(plain.key, plain.subkey, envelope(mallory, RUN, plain.key, plain.subkey, plain.value,
                                                             plain.expiration_time), plain.expiration_time)
        assert not reader.validate(forged)
        # a valid record moved to another key, or given another expiration, no longer verifies
        assert not reader.validate(DHTRecord(key_id(f"{RUN}/progress"), signed.subkey, stored, plain.expiration_time))
        assert not reader.validate(DHTRecord(plain.key, signed.subkey, stored, plain.expiration_time + 1))
        # no key in the subkey, oversized, too long-lived
        assert not reader.validate(DHTRecord(plain.key, MSGPackSerializer.dumps("alice"), stored,
                                             plain.expiration_time))
        big = record(alice, b"x" * MAX_RECORD_BYTES)
        assert not reader.validate(DHTRecord(big.key, big.subkey, signer.sign_value(big), big.expiration_time))
        far = record(alice, b"v", expiration=get_dht_time() + MAX_TTL_S + 3600)
        assert not reader.validate(DHTRecord(far.key, far.subkey, signer.sign_value(far), far.expiration_time))
        counts = reader.snapshot()
        reasons = {r for per_key in counts.values() for r in per_key}
        assert reasons == {"unsigned", "bad signature", "no writer key in the subkey", "oversized",
                           "expiration out of range"}, counts
        assert counts[key_id(f"{RUN}/peers")]["bad signature"] == 2  # the forgery and the changed expiration
        assert not reader.validate(forged) and counts == reader.snapshot()  # read again: counted once
    finally:
        signer.close()
        reader.close()


def test_hostile_envelopes_are_refused_without_raising() -> None:
    for raw in (b"", b"\xc1", msgpack.packb([1, 2, 3, 4]), msgpack.packb(["LBR1", "r", "v", b"s"]),
                msgpack.packb({"a": 1}), b"\x00" * 100):
        assert isinstance(parse_envelope(raw), str), raw


def trust(name: str, authority: NodeKey | None = None, key: NodeKey | None = None, grant: bytes = b"",
          max_nodes: int = 8) -> RunTrust:
    auth = None if authority is None else RunAuthority(authority.public, b"\0" * 64, open_run=False)
    return RunTrust(RUN, key or NodeKey.generate(), name, auth, grant, max_nodes=max_nodes)


def test_in_a_closed_run_only_granted_keys_write_and_only_under_their_granted_name(
        caplog: pytest.LogCaptureFixture) -> None:
    authority, a, rogue = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    grant_a = make_grant(authority, RUN, a.public, "a")
    reader = trust("reader", authority)
    caplog.set_level(logging.WARNING, logger="node.transport.dht_trust")
    good = pack_record(RUN, "a", grant_a, [1, 2])
    assert reader.open("peers", {a.public: good}) == {"a": [1, 2]}
    assert reader.open("done", {rogue.public: pack_record(RUN, "rogue", b"", ["fake"])}) == {}  # no grant
    assert reader.open("done", {rogue.public: pack_record(RUN, "a", grant_a, ["in a's name"])}) == {}  # a's grant
    assert reader.open("done", {a.public: pack_record("other-run", "a", grant_a, [1])}) == {}
    assert reader.open("done", {a.public: pack_record(RUN, "b", grant_a, [1])}) == {}  # a's grant is for "a"
    assert reader.open("done", {a.public: b"\x93junk"}) == {}
    assert reader.open("done", {b"short": good}) == {}
    assert reader.open("done", {a.public: pack_record(RUN, "bad\nname", grant_a, [1])}) == {}
    ignored = reader.rejections.snapshot()
    assert ignored["done: writer has no grant from the run's authority"] == 3, ignored  # rogue, a's grant moved, renamed
    assert {"done: written for another run", "done: malformed record", "done: not a lowband record",
            "done: malformed name"} <= set(ignored), ignored
    # the same record read again (every poll) is counted once, and logged once a minute at most
    for _ in range(5):
        reader.open("done", {rogue.public: pack_record(RUN, "rogue", b"", ["fake"])})
    assert reader.rejections.snapshot() == ignored
    logged = [r.getMessage() for r in caplog.records if "writer has no grant" in r.getMessage()]
    assert len(logged) == 1, logged


def test_names_belong_to_the_earliest_live_key_and_seats_stop_at_max_nodes() -> None:
    first, second, third = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    reader = trust("reader", max_nodes=2)  # an open run: names are first come, first served
    reader.update_roster([Member(first.public, "gpu", 0), Member(second.public, "gpu", 5),
                          Member(third.public, "cpu", 9)])
    assert reader.holder("gpu") == first.public
    got = reader.open("announce", {first.public: pack_record(RUN, "gpu", b"", 1),
                                   second.public: pack_record(RUN, "gpu", b"", 2),
                                   third.public: pack_record(RUN, "cpu", b"", 3)})
    assert got == {"gpu": 1}  # second: the name is first's; third: the third seat of two
    ignored = reader.rejections.snapshot()
    assert ignored == {"announce: name held by another member's key": 1,
                       "announce: writer is beyond the run's max_nodes": 1}, ignored


def test_names_and_kinds() -> None:
    assert name_problem("gpu0") is None
    for bad in ("", " x", "x" * 300, "a\tb", 5):
        assert name_problem(bad), bad
    assert [key_kind(RUN, f"{RUN}/{k}") for k in ("round/3", "round/3/have", "round/3/done", "peers", "want")] == [
        "announce", "have", "done", "peers", "want"]


def test_rejections_merge_the_validators_counts() -> None:
    r = Rejections("n")
    r.add("done", "writer has no grant from the run's authority", "x")
    r.set_validator_counts({("done", "bad signature"): 3})
    assert r.snapshot() == {"done: bad signature": 3, "done: writer has no grant from the run's authority": 1}
    assert r.total() == 4


RUN_TEXT = """\
[run]
id = "signed"
task = "gpt"
recipe = "sign"
rounds = 50

[task]
size = "tiny"
batch_size = 2
block_size = 32

[membership]
min_nodes = 2
max_nodes = 4
"""


def test_the_authority_signs_the_run_and_an_edited_run_file_no_longer_verifies(tmp_path: Path) -> None:
    authority = NodeKey.generate()
    text = sign_run_text(RUN_TEXT, authority, run_id="signed-2")
    run_file = parse_run_file(text)
    assert run_file.run.run_id == "signed-2"
    section = RunAuthority.from_section(run_file.authority)
    assert section.public == authority.public and not section.open_run
    assert section.signed("signed-2", signed_record(run_file, open_run=False))
    edited = parse_run_file(text.replace("rounds = 50", "rounds = 51"))
    assert not section.signed("signed-2", signed_record(edited, open_run=False))
    assert not section.signed("signed-2", signed_record(run_file, open_run=True))  # open is signed too
    with pytest.raises(ConfigError, match="no \\[authority\\] section"):
        RunAuthority.from_section({})
    with pytest.raises(ConfigError, match="public_key must be 64 hex"):
        RunAuthority.from_section({"public_key": "zz", "signature": "00" * 64})

    # a grant for one node's key and name, checked as the node checks it at start
    node_key = NodeKey.load_or_create(tmp_path / "node")
    (tmp_path / "node" / GRANT_FILE).write_text(grant_text(run_file, authority, node_key.public, "n0"))
    grant = load_grant(tmp_path / "node" / GRANT_FILE)
    assert grant is not None and grant.name == "n0"
    check_grant(grant, section, "signed-2", node_key, tmp_path / GRANT_FILE)
    with pytest.raises(ConfigError, match="grants another key"):
        check_grant(grant, section, "signed-2", NodeKey.generate(), tmp_path / GRANT_FILE)
    with pytest.raises(ConfigError, match="not this run's authority"):
        grant_text(run_file, NodeKey.generate(), node_key.public, "n1")
    (tmp_path / "junk.toml").write_text("grant = 3")
    with pytest.raises(ConfigError, match="is not a grant"):
        load_grant(tmp_path / "junk.toml")
    assert load_grant(tmp_path / "missing.toml") is None
