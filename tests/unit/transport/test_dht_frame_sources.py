"""Where a peer fetches an agreed frame from (node/transport/dht_frames.py ``FramePool.fetch_one``), through the
pool's ``request`` seam (no network): a source that cannot be reached — the frame's dead sender — or that does not
hold the frame is passed over for the next one, and the sources are tried again in turn until the time is up."""
from __future__ import annotations

import asyncio
from typing import Any

from node.transport.dht_frames import FramePool, digest
from node.transport import dht_frames

FRAME = b"frame of n3" * 50


def _pool(answers: dict[str, Any], calls: list[str]) -> FramePool:
    async def request(p2p: Any, peer_id: str, handler: str, req: bytes, idle_s: float, limit: int) -> Any:
        calls.append(peer_id)
        answer = answers[peer_id]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return FramePool("n0", "lowband.run.frame", fetch_timeout_s=1.0, request=request)


def test_a_dead_sender_does_not_keep_its_frame_from_a_member_that_holds_it() -> None:
    calls: list[str] = []
    pool = _pool({"n3": ConnectionError("failed to dial: dial backoff"), "n1": (dht_frames._MISSING, b""),
                  "n2": (dht_frames._OK, FRAME)}, calls)
    got = asyncio.run(pool.fetch_one(None, 6, "n3", ["n3", "n1", "n2"], len(FRAME), digest(FRAME), timeout=30.0))
    assert got == FRAME and calls == ["n3", "n1", "n2"]
    assert pool.get(6, digest(FRAME)) == FRAME  # held, and served to others from now on


def test_sources_are_tried_again_in_turn_and_one_that_lacks_the_frame_is_not_asked_twice() -> None:
    """n3's stream is cut twice, then it serves; n1 says it does not hold the frame: asked once."""
    calls: list[str] = []
    cuts = [ConnectionError("connection reset"), ConnectionError("connection reset")]

    async def request(p2p: Any, peer_id: str, handler: str, req: bytes, idle_s: float, limit: int) -> Any:
        calls.append(peer_id)
        if peer_id == "n1":
            return dht_frames._MISSING, b""
        if cuts:
            raise cuts.pop()
        return dht_frames._OK, FRAME

    pool = FramePool("n0", "lowband.run.frame", fetch_timeout_s=1.0, request=request)
    got = asyncio.run(pool.fetch_one(None, 6, "n3", ["n3", "n1"], len(FRAME), digest(FRAME), timeout=30.0))
    assert got == FRAME and calls == ["n3", "n1", "n3", "n3"]


def test_when_no_source_serves_the_frame_the_reason_comes_back() -> None:
    calls: list[str] = []
    pool = _pool({"n1": (dht_frames._MISSING, b""), "n2": (dht_frames._MISSING, b"")}, calls)
    why = asyncio.run(pool.fetch_one(None, 6, "n3", ["n1", "n2"], len(FRAME), digest(FRAME), timeout=30.0))
    assert why == "fetch failed: peer holds no such frame for this round" and calls == ["n1", "n2"]
