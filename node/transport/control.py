"""The control plane: the one seam between ``lowband node`` and whatever runs the run — a gRPC coordinator
(``grpc_control.GrpcControl``), nobody (peers agreeing over a hivemind DHT, ``dht_control.DhtControl``), or an
in-process run (``inprocess_plane.InProcessPlane``: tests, the daemon in one process). The daemon talks only to
this interface, so its round loop is the same in every mode; ``faults.FaultyPlane`` wraps any of them with a
seeded fault schedule, and tests/contract runs one contract suite against every implementation.

The values that cross the seam are typed (node/transport/messages.py); the exceptions and ``Identity`` live here
because every implementation raises / takes them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from node.config import RunConfig
from node.transport.messages import RoundResult, StateBlob, Submission

__all__ = ["ControlPlane", "Identity", "JoinInfo", "JoinRefused", "Rejoin", "StateBlob", "Stopped", "Submission"]


class JoinRefused(Exception):
    """The run will not have this node (incompatible config, token, name taken, run full, joined too late)."""


class Rejoin(Exception):
    """The coordinator no longer knows this node (lease expired): join again and fetch state."""


class Stopped(Exception):
    """The node is shutting down."""


@dataclass
class Identity:
    """What a node declares when it joins."""

    name: str
    config_json: str
    config_hash: str
    task_fingerprint: str
    model_digest: str
    capabilities: tuple[str, ...] = ()
    join_token: str = ""
    #: the node's ed25519 public key (node/identity.py), which signs its frames; b"" for a node without one
    public_key: bytes = b""


@dataclass(frozen=True)
class JoinInfo:
    """What joining tells the node: its data shard and the first round it contributes to."""

    shard: int
    num_shards: int
    first_round: int
    committed_rounds: int  # rounds the run had committed when we joined (for the log)


class ControlPlane(Protocol):
    #: where the run lives, for log lines ("127.0.0.1:7070", "dht")
    where: str
    #: set when the run forgot this node (the daemon then joins again)
    lost: threading.Event

    @property
    def current_round(self) -> int:
        """The run's open round as last seen (0 when unknown): the daemon fetches state when it fell behind."""

    def get_run_config(self) -> RunConfig:
        """The run as the control plane defines it (the coordinator's; in serverless mode the local run file)."""

    def join(self, identity: Identity) -> JoinInfo:
        """Enter the run; raises ``JoinRefused`` with the reason (e.g. the differing config fields)."""

    def exchange(self, submission: Submission, timeout_s: float) -> RoundResult:
        """Offer this node's frame for ``submission.round`` and return the round's outcome within ``timeout_s``
        (never raises on network faults: the status says what happened). ``result.state_needed`` means the replica
        diverged or fell out of the run and must fetch the state. Raises ``Rejoin`` when the run forgot this node,
        ``Stopped`` when the node is shutting down."""

    def observe(self, round_: int, timeout_s: float, fingerprint: str = "") -> RoundResult:
        """The outcome of ``round_`` without contributing to it (waits for it to close); peers do not wait for
        this node in it. ``fingerprint``: this replica's reference. ``state_needed`` when the round's result is no
        longer available (or this replica's reference is not the run's)."""

    def round_started(self, round_: int) -> bool | None:
        """Whether the members already sent their frames for ``round_`` (or it closed): with overlapped rounds they
        are then training the next one. None where the plane cannot tell; the daemon then does not wait for it."""

    #: whether ``observe`` of a round closed a while ago answers from a held result at once (a coordinator keeps
    #: ``keep_results`` of them): a node resuming from a checkpoint a few rounds behind then catches up from them
    #: instead of downloading the whole state. Planes that do not say so are taken not to.
    serves_past_results: bool

    def fetch_state(self, after_round: int | None, timeout_s: float, at_least: int = 0) -> StateBlob | None:
        """The run's global state — once ``after_round`` closed, if given — or None where none can be had.
        ``at_least``: the committed rounds this node holds; a state of fewer is not taken where the run has one of
        as many (a node never goes back to an older state and applies rounds again)."""

    def offer_state(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes]) -> None:
        """After applying a round: serve this replica's state to joiners where peers do that (serverless); a no-op
        where a server holds the state. ``make_blob`` is called only if someone needs it."""

    def leave(self, reason: str) -> None:
        """Leave the run now (not by lease expiry)."""

    def close(self) -> None:
        """Release connections, threads and child processes."""
