"""A rogue DHT peer against a closed serverless run. Honest ``NodeDaemon``s train in threads of this process over
real DHTs (a DHT + p2pd each, 127.0.0.1, NAT off), each with its authority's grant, through ``DhtControl``. A plain
hivemind DHT — no validator, so it keeps whatever it is given — joins the same DHT knowing only the run id, and
while the honest nodes train it writes every kind of forged record that used to take a run over:

- one outcome naming a frame it serves, and outcomes for many rounds (the run applied only its frame, or stalled);
- a ``config`` record signed by a key of its own (every new node was refused);
- ``progress = 10**9`` (every peer thought it fell behind) and a state offer after 99999 rounds with a fingerprint
  of its own (a joiner adopted it);
- records in the honest nodes' names: a heartbeat as ``d0`` under its key, an outcome under ``d0``'s key signed
  with its own, an unsigned record under ``d1``'s key; an announcement of a frame for the open round.

Every honest node's rounds go on to the run's end with one fingerprint per round on all of them — a node joining
mid-run included, which takes the members' state, not the offered one — and every honest node counts the forged
records it read as rejected, by kind and reason.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import hivemind
import msgpack
import pytest
from hivemind.utils import get_dht_time

from node.bench.invariants import replica_problems
from node.daemon import NodeDaemon, NodeOptions
from node.identity import NodeKey
from node.roundlog import read_round_log
from node.runfile import RunFile, build_run_file, parse_run_file
from node.transport.dht_authority import sign_run_text
from node.transport.dht_control import DhtSettings
from node.transport.dht_process import start_dht
from node.transport.dht_signing import SignedRecordValidator, envelope, key_id
from node.transport.dht_trust import RunAuthority, make_grant, pack_record

from dht_harness import NET, no_orphaned_p2pd  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("no_orphaned_p2pd")
RUN_ID = "rogue-run"
ROUNDS = 12
BOUND_S = 240.0


@pytest.fixture
def authority() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def run_file(authority: NodeKey) -> RunFile:
    text = build_run_file(run_id=RUN_ID, recipe="sign", rounds=ROUNDS,
                          task_params={"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 1},
                          recipe_overrides={"H": 2, "inner.lr": 2e-3},
                          membership={"min_nodes": 2, "max_nodes": 8, "heartbeat_s": 0.5, "lease_s": 5.0},
                          rounds_policy={"initial_wait_s": 10.0, "min_wait_s": 1.0, "max_wait_s": 10.0,
                                         "eval_every": 0})
    return parse_run_file(sign_run_text(text, authority))


class Rogue:
    """A plain hivemind DHT peer with a key of its own that writes forged lowband records."""

    def __init__(self, initial_peers: list[str], victims: dict[str, NodeKey]) -> None:
        self.key, self.victims = NodeKey.generate(), victims
        self.dht = hivemind.DHT(initial_peers=initial_peers, start=True, **NET)
        self.stop = threading.Event()
        self.follow: Callable[[], int] = lambda: 0  # the round the honest nodes are in: where to forge
        self.writes = 0

    def store(self, key: str, body: Any, *, name: str = "rogue", signer: NodeKey | None = None,
              under: NodeKey | None = None, unsigned: bool = False) -> None:
        """A record under ``under``'s key (default: ours), signed by ``signer`` (default: ours) or not at all."""
        owner, signer = under or self.key, signer or self.key
        expiration = get_dht_time() + 60.0
        inner = hivemind.utils.MSGPackSerializer.dumps(pack_record(RUN_ID, name, b"", body))
        value: Any = inner if unsigned else msgpack.unpackb(envelope(
            signer, RUN_ID, key_id(key), hivemind.utils.MSGPackSerializer.dumps(owner.public), inner, expiration))
        # bounded: a store in flight when the DHT shuts down never resolves (hivemind's None-timeout trap)
        self.dht.store(key, value, expiration, subkey=owner.public, return_future=True).result(timeout=30)
        self.writes += 1

    def forge(self) -> None:
        fake_sha = "ab" * 32
        self.store(f"{RUN_ID}/config", ['{"recipe": "evil"}', b"\x01" * 64])  # signed by no authority we know
        self.store(f"{RUN_ID}/progress", 10 ** 9)
        self.store(f"{RUN_ID}/state", ["12D3KooWRogue", 99999, 1 << 20, fake_sha, "0" * 16])
        self.store(f"{RUN_ID}/peers", ["12D3KooWRogue", "live", 0, 0, 0, 0], name="d0")  # d0's name, our key
        self.store(f"{RUN_ID}/peers", ["x", "live", 0, 0, 0, 0], under=self.victims["d1"], unsigned=True)
        at = max(0, self.follow())
        for r in range(at, at + 3):  # the open round and the next ones: one outcome naming our frame
            done = ["12D3KooWRogue", "", get_dht_time() - 100.0, True, [["rogue", fake_sha]], ["rogue"]]
            self.store(f"{RUN_ID}/round/{r}/done", done)
            self.store(f"{RUN_ID}/round/{r}/done", done, name="d0", under=self.victims["d0"])  # in d0's name
            self.store(f"{RUN_ID}/round/{r}", ["12D3KooWRogue", 100, fake_sha, ""])

    def forge_many(self) -> None:
        for r in range(ROUNDS + 5):  # outcomes for every round of the run at once
            self.store(f"{RUN_ID}/round/{r}/done", ["12D3KooWRogue", "", get_dht_time(), True, [], ["rogue"]])

    def loop(self) -> None:
        while not self.stop.wait(0.3):  # keep forging while the honest nodes train
            try:
                self.forge()
            except Exception:  # the DHT going away at the end of the test
                if self.stop.is_set():
                    return
                raise

    def close(self, forging: threading.Thread | None = None) -> None:
        """Stop forging (waiting for the loop's store in flight, which is bounded) and shut the DHT down."""
        self.stop.set()
        if forging is not None:
            forging.join(60)
        self.dht.shutdown()


@pytest.fixture
def boot() -> Iterator[list[str]]:
    """A bootstrap peer that validates records (as ``lowband dht`` does)."""
    validator = SignedRecordValidator()
    dht = start_dht(record_validators=[validator], **NET)
    dht.wait_until_ready(timeout=60)
    try:
        yield [str(m) for m in dht.get_visible_maddrs()]
    finally:
        dht.shutdown()
        validator.close()


def daemon(root: Path, run_file: RunFile, authority: NodeKey, boot: list[str], name: str,
           key: NodeKey) -> tuple[NodeDaemon, Any]:
    """``name``'s daemon on its own thread, with a grant from ``authority`` (as ``lowband run grant`` makes)."""
    mp = run_file.membership
    settings = DhtSettings(tuple(boot), ("/ip4/127.0.0.1/tcp/0",), num_shards=mp.max_nodes, min_nodes=mp.min_nodes,
                           heartbeat_s=mp.heartbeat_s, round_wait_s=run_file.deadline.max_wait_s,
                           deadline=run_file.deadline, authority=RunAuthority.from_section(run_file.authority),
                           key=key, grant=make_grant(authority, RUN_ID, key.public, name))
    d = NodeDaemon(NodeOptions("", root / name, name, "cpu", run_file.run, round_timeout_s=BOUND_S, dht=settings))
    out: dict[str, Any] = {}
    th = threading.Thread(target=lambda: out.__setitem__("code", d.run()), name=f"daemon-{name}")
    th.start()
    return d, (th, out)


def committed(d: NodeDaemon) -> int:
    return -1 if d.worker is None else d.worker.reference.committed_rounds


def wait_until(condition: Any, what: str, bound_s: float = BOUND_S) -> None:
    stop = threading.Event()
    for _ in range(int(bound_s / 0.05)):
        if condition():
            return
        stop.wait(0.05)  # polling the daemons' progress, bounded
    raise AssertionError(f"{what}: not within {bound_s:.0f} s")


@pytest.mark.timeout(420)
def test_a_rogue_peer_cannot_take_over_a_closed_run(tmp_path: Path, run_file: RunFile, authority: NodeKey,
                                                    boot: list[str]) -> None:
    keys = {n: NodeKey.generate() for n in ("d0", "d1", "d2")}
    rogue = Rogue(boot, keys)
    forging = threading.Thread(target=rogue.loop, name="rogue", daemon=True)
    try:
        rogue.forge()  # before any honest node: an "earlier" config, a run "under way" at round 10**9
        rogue.forge_many()
        forging.start()
        daemons = {n: daemon(tmp_path, run_file, authority, boot, n, keys[n]) for n in ("d0", "d1")}
        rogue.follow = lambda: max(committed(d) for d, _ in list(daemons.values()))
        wait_until(lambda: min(committed(d) for d, _ in daemons.values()) >= 3, "d0 and d1 commit 3 rounds")
        daemons["d2"] = daemon(tmp_path, run_file, authority, boot, "d2", keys["d2"])  # joins mid-run, among forgeries
        for name, (d, (th, out)) in daemons.items():
            th.join(BOUND_S)
            assert not th.is_alive() and out.get("code") == 0, (name, out)
    finally:
        rogue.close(forging if forging.is_alive() else None)
    assert rogue.writes > 50

    logs = {name: read_round_log(tmp_path / name) for name in daemons}
    problems = replica_problems(logs)  # rounds in sequence, one fingerprint and member list per round everywhere
    assert not problems, "\n".join(problems)
    fingerprints: dict[int, str] = {}
    for name, entries in logs.items():
        applied = [e for e in entries if "round" in e]
        assert applied and applied[-1]["round"] == ROUNDS - 1, (name, applied[-3:])  # to the run's end
        for e in applied:
            assert "rogue" not in e["members"], (name, e)
            fingerprints.setdefault(e["round"], e["fingerprint"])
    joined = [e for e in read_round_log(tmp_path / "d2") if e.get("event") == "state"]
    assert joined and 3 <= joined[0]["committed_rounds"] < ROUNDS, joined  # the members' state, not 99999 rounds
    assert fingerprints[joined[0]["committed_rounds"] - 1] == joined[0]["fingerprint"]

    no_grant = "writer has no grant from the run's authority"
    for name, (d, _) in daemons.items():
        rejected = d.plane.transport.rejected  # type: ignore[union-attr]
        for expected in ("config: not signed by the run's authority", f"peers: {no_grant}", f"done: {no_grant}",
                         f"announce: {no_grant}"):
            assert rejected.get(expected, 0) > 0, (name, expected, rejected)
        # forged under an honest key: refused by the DHT layer itself (the signature is not that key's)
        assert rejected.get("done: bad signature", 0) + rejected.get("peers: unsigned", 0) > 0, (name, rejected)
        assert rejected.get(f"progress: {no_grant}", 0) > 0, (name, rejected)
    assert daemons["d2"][0].plane.transport.rejected.get(f"state: {no_grant}", 0) > 0  # type: ignore[union-attr]
