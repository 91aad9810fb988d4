"""The compressed downlink over a real gRPC coordinator (``[rounds] result = "compressed"``, docs/algorithms.md §12):
every member receives one frame in the run's codec, no bigger than its own upload, and lands on the coordinator's
fingerprint; a joiner loads the state the coordinator serves (which carries the downlink residual)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest

from node.transport.messages import StateBlob

from plane_harness import Group
from test_plane_contract import NAMES, exchange_all


@pytest.fixture
def compressed(tmp_path: Path) -> Iterator[Group]:
    g = Group("grpc", NAMES, tmp_path, 1.5, rounds_extra={"result": "compressed"})
    yield g
    g.close()


def test_members_get_one_compressed_frame_and_stay_on_the_coordinators_state(compressed: Group) -> None:
    g = compressed
    for r in range(2):
        subs = {n: g.submission(n, r) for n in NAMES}
        results = exchange_all(g, subs)
        for n, res in results.items():
            assert res.committed and res.members == NAMES and res.payloads == {}, (n, res.reason)
            assert res.aggregate_codec == "sign" and res.bytes_received == len(res.aggregate)
            assert len(res.aggregate) <= 1.05 * len(subs[n].frame)
            assert g.workers[n].apply(res).contributed
            assert g.workers[n].fingerprint() == res.reference_fingerprint
        assert len({res.aggregate for res in results.values()}) == 1
    joiner = g.connect("j")
    info = joiner.join(g.identity("j"))
    got: dict[str, StateBlob | None] = {}
    th = threading.Thread(target=lambda: got.__setitem__("state", joiner.fetch_state(None, 60.0)))
    th.start()
    th.join(90)
    state = got.get("state")
    assert state is not None and b"downlink/" in state.blob[:1 << 16]  # the residual rides in the served state
    fresh = g.workers["a"].__class__("j", g.cfg, g.task, shard=info.shard, num_shards=info.num_shards)
    fresh.adopt_global_state(state.blob)
    assert fresh.fingerprint() == g.workers["a"].fingerprint() and fresh.reference.committed_rounds == 2
