"""``ControlPlane`` over the gRPC coordinator: a thin adapter around ``GrpcTransport``."""
from __future__ import annotations

import json
import threading
from typing import Callable

import grpc

from node.config import RunConfig, run_config_from_dict
from node.identity import NodeKey
from node.transport.control import Identity, JoinInfo, JoinRefused
from node.transport.grpc_auth import ClientTls
from node.transport.messages import RoundResult, StateBlob, Submission
from node.transport.grpc_client import REFUSALS, GrpcTransport
from node.transport.limits import ResultLimits


class GrpcControl:
    """``key``: the node's identity key (node/identity.py; a fresh one when None); ``tls``: the channel's TLS
    settings (None: plaintext, which ``lowband node`` allows only to a loopback coordinator or with --insecure);
    ``token``: the run's join token, also shown to GetRun and Status."""

    serves_past_results = True  # the coordinator keeps ``keep_results`` results (from memory or its log)

    def __init__(self, address: str, stop: threading.Event, *, key: NodeKey | None = None,
                 tls: ClientTls | None = None, token: str = "") -> None:
        self.where = address
        self.transport = GrpcTransport(address, stop, key=key, tls=tls, token=token)
        self.lost: threading.Event = self.transport.lost

    @property
    def current_round(self) -> int:
        return self.transport.current_round

    def get_run_config(self) -> RunConfig:
        """The run the coordinator serves; a refusal (a missing or wrong join token) raises ``JoinRefused``, which
        ``lowband node`` reports in one line (exit 3) instead of a traceback."""
        try:
            run = self.transport.get_run()
        except grpc.RpcError as exc:
            if exc.code() not in REFUSALS:
                raise
            hint = (" (this node's join token is missing or wrong: pass --join-token TOKEN or set $LOWBAND_JOIN_TOKEN)"
                    if exc.code() == grpc.StatusCode.UNAUTHENTICATED else "")
            raise JoinRefused(f"{exc.code().name}: {exc.details()}{hint}") from None
        return run_config_from_dict(json.loads(run.config_json))

    def join(self, identity: Identity) -> JoinInfo:
        self.transport.identity = identity
        resp = self.transport.join()
        return JoinInfo(resp.shard, resp.num_shards, resp.first_round, resp.committed_rounds)

    def bound_results(self, limits: ResultLimits) -> None:
        """What this node reads at most of a result or a state (its model's bounds, node/transport/limits.py)."""
        self.transport.limits = limits

    def exchange(self, submission: Submission, timeout_s: float) -> RoundResult:
        # the coordinator checks replicas itself: it publishes its reference fingerprint with every result
        s = submission
        return self.transport.exchange(s.round, s.frame, timeout_s, s.loss, s.sender)

    def observe(self, round_: int, timeout_s: float, fingerprint: str = "") -> RoundResult:
        return self.transport.collect(round_, timeout_s, submitted=False)

    def round_started(self, round_: int) -> bool | None:
        status = self.transport.status()
        return status.current_round > round_ or (status.current_round == round_ and len(status.submitted) > 0)

    def fetch_state(self, after_round: int | None, timeout_s: float, at_least: int = 0) -> StateBlob | None:
        if after_round is not None:  # observe the round close (we did not submit to it), then take its state
            self.transport.collect(after_round, timeout_s, submitted=False)
            at_least = max(at_least, after_round + 1)
        return self.transport.fetch_state(at_least=at_least)

    def offer_state(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes]) -> None:
        pass  # the coordinator serves the state

    def leave(self, reason: str) -> None:
        self.transport.leave(reason)

    def close(self) -> None:
        self.transport.close()
