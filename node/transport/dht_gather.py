"""Moving whole frames: the all-gather of a serverless round (every peer pulls every agreed member's frame), the
fetch both the agreement and the adoption of a round use, and the warning for a frame left out.

Mixed into ``DhtTransport`` (dht.py), which runs the round; above ``shard_above`` agreed members the round is
reduced by shard instead (``dht_sharded``) and only this module's warning is used.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from node.clock import Clock
from node.transport.dht_agreement import Announcement, Outcome, adopt_sources, commit_reason
from node.transport.dht_frames import FramePool
from node.transport.dht_members import DhtMembers
from node.transport.messages import RoundResult, RoundStatus

log = logging.getLogger(__name__)


class FrameGather(DhtMembers):
    """Mixed into ``DhtTransport`` (which sets these)."""

    frames: FramePool
    clock: Clock
    fetch_timeout_s: float
    p2p: Any

    _publish_done: Callable[..., None]  # DhtTransport's: store this peer's outcome record

    def _drop_warning(self, round_: int, sender: str, why: str) -> None:
        """A frame left out of a round: a warning per sender at most every ``WARN_EVERY_S`` (a diverged or broken
        peer is left out of every round)."""
        self._warn_every(f"dropped {sender}", "[node=%s round=%d] dropped %s: %s", self.name, round_, sender, why,
                         logger=log)

    def _fetch(self, round_: int, wanted: dict[str, tuple[list[str], int | None, str]],
               deadline: float) -> tuple[dict[str, bytes | str], int]:
        """Pull frames: results, bytes received. A stream must keep moving (``fetch_timeout_s`` per step) and
        retries end after ``fetch_timeout_s``; a transfer that moves may run to the caller's deadline (a large frame
        on a slow link)."""
        before = {s for s, (_src, _size, sha) in wanted.items() if self.frames.get(round_, sha) is not None}
        left = max(0.1, deadline - self.clock.now())
        budget = min(self.fetch_timeout_s, left)
        try:
            got = self._run(self.frames.fetch_all(self.p2p, round_, wanted, budget, longest=left),
                            timeout=left + self.rpc_timeout_s)
        except Exception as exc:  # only if the loop itself is gone; each fetch is bounded on its own
            got = {s: f"fetch failed: {exc!r}" for s in wanted}
        received = sum(len(v) for s, v in got.items() if isinstance(v, bytes) and s not in before)
        return got, received

    def _fetch_announced(self, round_: int, announced: dict[str, Announcement], deadline: float,
                         held: set[Pair]) -> int:
        """Fetch the frames of ``announced`` into ``held`` (a frame that cannot be had is logged and left out);
        bytes received."""
        fetched, received = self._fetch(round_, {s: ([a.peer_id], a.size, a.sha256) for s, a in announced.items()},
                                        deadline)
        for sender, got in sorted(fetched.items()):
            if isinstance(got, bytes):
                held.add((sender, announced[sender].sha256))
            else:
                self._drop_warning(round_, sender, got)
        return received

    def _adopt(self, round_: int, outcome: Outcome, announced: dict[str, Announcement], mine: str, deadline: float,
               received: int) -> RoundResult:
        """Commit exactly ``outcome``'s frames (``dht_agreement.adopt_sources``). A frame none can serve means
        fetching the state."""
        fetched, more = self._fetch(round_, adopt_sources(outcome, announced), deadline)
        received += more
        sent = self.frames.served.get(round_, 0)
        lacking = sorted(s for s, got in fetched.items() if not isinstance(got, bytes))
        if lacking:
            return RoundResult(round_, RoundStatus.FRAMES_UNAVAILABLE, reason="the members agreed on frames this "
                               f"node could not get ({', '.join(lacking)}): fetching the state instead",
                               bytes_sent=sent, bytes_received=received)
        if outcome.publisher != self.name:  # the same outcome again: more sources for peers that missed frames
            self._publish_done(round_, mine, True, outcome.pairs, outcome.confirmed, outcome.published_at, wait=False)
            if self.name in announced and (self.name, announced[self.name].sha256) not in outcome.pairs:
                log.info("[node=%s round=%d] %s decided the round without our latest frame", self.name, round_,
                         outcome.publisher)
        payloads = {s: f for s, f in sorted(fetched.items()) if isinstance(f, bytes)}  # all of them (none lacking)
        keys = {s: self.trust.writers[s] for s in payloads if s in self.trust.writers}  # whose key signs whose frames
        keys = keys if len(keys) == len(payloads) else {}  # all or none (docs/algorithms.md §11)
        return RoundResult(round_, RoundStatus.COMMITTED, payloads, reason=commit_reason(announced, payloads),
                           bytes_sent=sent, bytes_received=received, member_keys=keys)

