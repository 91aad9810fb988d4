"""Shared pieces of the real-p2pd DhtTransport tests (tests/unit/transport, tests/fault): peers in one process, each
with its own hivemind DHT + p2pd on 127.0.0.1 (port 0, NAT traversal off), and the fixtures they need. Test modules
import the fixtures they use from here."""
from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Mapping

import pytest

from node.bench.proctable import p2pd_processes
from node.config import TaskConfig
from node.recipes import make_run_config
from node.train.simulate import build_task
from node.identity import NodeKey
from node.train.worker import Worker
from node.transport.dht import DhtTransport
from node.transport.dht_trust import RunTrust
from node.transport.dht_faults import DhtFaults
from node.transport.messages import RoundResult

NAMES = ("w0", "w1", "w2")
KEYS = {name: NodeKey.generate() for name in NAMES}  # each peer's identity: its DHT records and its frames
ROUND_WAIT_S = 2.0
NET: dict[str, Any] = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False,
                       "use_relay": False}
TASK_PARAMS: dict[str, Any] = {"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 2}


OWNER_ENV = "LOWBAND_TEST_P2PD_OWNER"


def p2pd_pids(owner: str) -> set[int]:
    """The p2pd processes started under ``no_orphaned_p2pd``'s marker ``owner`` (the machine is shared: other test
    runs start and stop their own p2pd meanwhile), read from /proc."""
    return p2pd_processes(environ={OWNER_ENV: owner})


@pytest.fixture(scope="module")
def no_orphaned_p2pd() -> Iterator[None]:
    """Every p2pd these tests start must be gone after them. They inherit a marker in their environment (through
    the DHT process hivemind forks), so only this module's count."""
    owner = uuid.uuid4().hex
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(OWNER_ENV, owner)
        yield
    deadline = time.monotonic() + 15
    while (left := p2pd_pids(owner)) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a process table, not synchronising peers
    assert not left, f"p2pd processes left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """A tiny sign-recipe run config and its task (the stdlib corpus cached under this session's temp dir)."""
    cache = tmp_path_factory.getbasetemp() / "lowband-corpus-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBAND_CACHE", str(cache))
        cfg = make_run_config("sign", {"H": 2}, task=TaskConfig("gpt", dict(TASK_PARAMS)), workers=3, rounds=3,
                              seed=0)
        yield cfg, build_task(cfg)


def workers(setup: tuple[Any, Any]) -> list[Worker]:
    """A worker per peer, signing its frames with the key its peer writes its DHT records with (``KEYS``)."""
    cfg, task = setup
    return [Worker(n, cfg, task, shard=i, num_shards=len(NAMES), key=KEYS[n]) for i, n in enumerate(NAMES)]


@contextlib.contextmanager
def peers(run_id: str, *, round_wait_s: float = ROUND_WAIT_S, faults: Mapping[str, DhtFaults] | None = None,
          **kw: Any) -> Iterator[list[DhtTransport]]:
    """Three joined transports: the first starts the DHT, the others bootstrap from its visible addresses.
    ``faults``: name → the fault seam that peer consults; ``kw``: more ``DhtTransport`` settings for all three."""
    made: list[DhtTransport] = []
    faults = faults or {}
    try:
        for name in NAMES:
            boot = made[0].visible_maddrs() if made else []
            made.append(DhtTransport.create(run_id, name, boot, round_wait_s=round_wait_s, faults=faults.get(name),
                                            trust=RunTrust(run_id, KEYS[name], name), **NET, **kw))
        for t in made:
            t.join()
        yield made
    finally:
        for t in made:
            t.close()


def collect_all(ts: list[DhtTransport], round_: int, timeout_s: float = 30.0) -> dict[str, RoundResult]:
    """collect() on every peer at once, as separate nodes would; joins are bounded."""
    results: dict[str, RoundResult] = {}
    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t.name, t.collect(round_, timeout_s)))
               for t in ts]
    for th in threads:
        th.start()
    for th in threads:
        th.join(min(timeout_s, 300.0) + 30)  # (a timeout on a virtual clock is no bound on the wall clock)
    assert not any(th.is_alive() for th in threads), "a collect() did not return in time"
    assert set(results) == {t.name for t in ts}
    return results


def fetch_in_background(joiner: DhtTransport, need: int, timeout_s: float,
                        gather_s: float | None = None) -> tuple[threading.Thread, dict[str, Any]]:
    """``joiner.state.fetch`` on its own thread (as a joining node runs it while the donors go on)."""
    out: dict[str, Any] = {}
    th = threading.Thread(target=lambda: out.__setitem__("got", joiner.state.fetch(need, timeout_s, gather_s)))
    th.start()
    return th, out


def eventually(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.05)  # polling a condition, bounded


def offer_until_wanted(donors: list[DhtTransport], committed: int, blob: bytes, timeout_s: float) -> None:
    """Each donor offers at its 'round boundary' once the joiner's want record is visible to it."""
    pending = list(donors)
    deadline = time.monotonic() + timeout_s
    while pending:
        assert time.monotonic() < deadline, f"{[d.name for d in pending]} never saw the joiner's want record"
        pending = [d for d in pending if not d.state.offer(committed, "fp", lambda: blob)]
        if pending:
            time.sleep(0.05)  # polling the DHT, as a donor does once per round
