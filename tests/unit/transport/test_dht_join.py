"""Joining a serverless run through ``DhtControl`` (real DHTs on 127.0.0.1, NAT off): who the run admits — a grant in
a closed run, a name no other live key holds, a free seat below ``max_nodes`` — and data shards that no two live
members share, also when nodes join at the same moment."""
from __future__ import annotations

import json
import threading
from contextlib import ExitStack
from typing import Any, Iterator

import pytest

from node.identity import NodeKey
from node.runfile import RunFile, build_run_file, parse_run_file
from node.transport.control import Identity, JoinInfo, JoinRefused
from node.transport.dht_authority import run_identity, signed_record
from node.transport.dht_control import DhtControl, DhtSettings
from node.transport.dht_process import start_dht
from node.transport.dht_signing import SignedRecordValidator
from node.transport.dht_trust import RunAuthority, make_grant

from dht_harness import NET

pytestmark = pytest.mark.usefixtures("no_orphaned_p2pd")


def make_run(run_id: str, max_nodes: int, min_nodes: int = 1) -> RunFile:
    return parse_run_file(build_run_file(
        run_id=run_id, recipe="sign", rounds=50,
        task_params={"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 1},
        recipe_overrides={"H": 1}, membership={"min_nodes": min_nodes, "max_nodes": max_nodes, "heartbeat_s": 0.5,
                                               "lease_s": 5.0}))


class Run:
    """A run signed by ``authority`` on a bootstrap DHT; ``node(name, key)`` makes a ``DhtControl`` for it."""

    def __init__(self, stack: ExitStack, run_file: RunFile, open_run: bool) -> None:
        self.run_file, self.authority = run_file, NodeKey.generate()
        self.section = RunAuthority(self.authority.public, RunAuthority.sign(
            self.authority, run_file.run.run_id, signed_record(run_file, open_run)), open_run)
        self.fingerprint, self.digest = run_identity(run_file)
        validator = SignedRecordValidator()
        dht = start_dht(record_validators=[validator], **NET)
        dht.wait_until_ready(timeout=60)
        stack.callback(validator.close)
        stack.callback(dht.shutdown)
        self.boot = tuple(str(m) for m in dht.get_visible_maddrs())
        self.stack, self.stop = stack, threading.Event()

    def node(self, name: str, key: NodeKey, grant: bool = True) -> DhtControl:
        mp, cfg = self.run_file.membership, self.run_file.run
        settings = DhtSettings(self.boot, tuple(NET["host_maddrs"]), num_shards=mp.max_nodes, min_nodes=mp.min_nodes,
                               heartbeat_s=mp.heartbeat_s, round_wait_s=2.0, start_timeout_s=120.0,
                               authority=self.section, key=key,
                               grant=make_grant(self.authority, cfg.run_id, key.public, name) if grant else b"")
        plane = DhtControl(cfg, settings, name, self.stop)
        self.stack.callback(plane.close)
        return plane

    def identity(self, name: str) -> Identity:
        cfg = self.run_file.run
        return Identity(name, json.dumps(cfg.to_dict()), cfg.config_hash(self.fingerprint), self.fingerprint,
                        self.digest)

    def join(self, plane: DhtControl) -> JoinInfo:
        return plane.join(self.identity(plane.name))


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.mark.timeout(180)
def test_a_closed_run_admits_granted_keys_under_their_names_and_refuses_the_rest(stack: ExitStack) -> None:
    run = Run(stack, make_run("join-closed", max_nodes=4), open_run=False)
    key = NodeKey.generate()
    assert run.join(run.node("n0", key)).first_round == 0
    with pytest.raises(JoinRefused, match="has no grant to join run 'join-closed' as 'n1'.*lowband run grant"):
        run.join(run.node("n1", NodeKey.generate(), grant=False))


@pytest.mark.timeout(180)
def test_a_name_is_its_keys_a_restart_with_the_same_key_keeps_it_and_the_run_is_full_at_max_nodes(
        stack: ExitStack) -> None:
    run = Run(stack, make_run("join-open", max_nodes=2), open_run=True)
    first = NodeKey.generate()
    a = run.node("gpu", first)
    info = run.join(a)
    with pytest.raises(JoinRefused, match="the name 'gpu' is held by a live member with another key .* names are "
                                          "labels, keys are identities"):
        run.join(run.node("gpu", NodeKey.generate()))
    again = run.join(run.node("gpu", first))  # the same key (a restart from its workdir) keeps its name and shard
    assert again.shard == info.shard
    run.join(run.node("cpu", NodeKey.generate()))
    with pytest.raises(JoinRefused, match="the run is full: 2 live members, max_nodes 2"):
        run.join(run.node("third", NodeKey.generate()))


@pytest.mark.timeout(240)
def test_nodes_joining_at_once_get_distinct_shards(stack: ExitStack) -> None:
    """Four nodes, four shards, all joining at the same moment (each waits for min_nodes = 4 live peers): the
    keys' preferred shards collide often; the claims are read back and the later to join moves."""
    run = Run(stack, make_run("join-shards", max_nodes=4, min_nodes=4), open_run=True)
    planes = [run.node(f"n{i}", NodeKey.generate()) for i in range(4)]
    infos: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda p=p: infos.__setitem__(p.name, run.join(p))) for p in planes]
    for th in threads:
        th.start()
    for th in threads:
        th.join(180)
    assert len(infos) == 4, infos
    assert sorted(i.shard for i in infos.values()) == [0, 1, 2, 3], infos
    beats = planes[0].transport.heartbeats()
    assert {n: hb.shard for n, hb in beats.items()} == {n: i.shard for n, i in infos.items()}
