"""Adversarial review (adv-models): the robust state keeps a ``MemberRecord`` for every *name* that ever sent a frame,
for good (node/robust/state.py, ``reduce_round``): nothing prunes it, and nothing bounds it when it is written. The
reader refuses a state listing more than ``MAX_MEMBERS`` (65 536) records. A member with the join token that rejoins
under a fresh name and key (docs/security.md, "Known limits") adds one record per name per round it sends — with a
few sessions at once, every few thousand rounds — until the coordinator writes a state that neither it (restart) nor
any joiner can load: the run cannot be resumed. (The 16 MiB header bound of the state file is reached at about the
same count.)

SECURITY BUG (xfail, strict): what the writer produces must be loadable. Suggested fix: bound the records where they
are made — deterministically on every replica, e.g. forget records of members that are not evicted and were not
flagged in their window once the count exceeds a cap below MAX_MEMBERS (oldest first by a ``last_round`` field), and
keep the evicted ones keyed by key id rather than name (tests/security/test_adv_eviction.py)."""
from __future__ import annotations

import pytest

from node.config import ReduceConfig
from node.robust.defaults import untrusted
from node.robust.state import MAX_MEMBERS, MemberRecord, RobustState, RobustStateError, record_frame


@pytest.mark.xfail(strict=True, raises=RobustStateError,
                   reason="SECURITY BUG: records grow without bound; past MAX_MEMBERS the state written is unloadable")
def test_the_state_written_after_many_one_frame_members_can_be_loaded_back() -> None:
    cfg = ReduceConfig(**untrusted("identity"))
    one = record_frame(MemberRecord(), 0, False, False, False, 1.0, 0.9, cfg)
    state = RobustState((1.0,), {f"sybil-{i}": one for i in range(MAX_MEMBERS + 1)})  # as reduce_round leaves it
    RobustState.from_state(state.header(), state.tensors()["robust/history"], 1)
