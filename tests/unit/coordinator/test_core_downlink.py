"""The compressed downlink (``[rounds] result = "compressed"``, node/train/downlink.py): the coordinator re-encodes the
round's aggregate with the run's codec and its own error-feedback residual, and every member applies that one frame.

An oracle written here with plain torch ops (DoubleSqueeze, arXiv 1905.05957) against the coordinator's commit path;
replicas against the coordinator through its core (fake clock, real workers), across a restart; the residual in the
state; what a member refuses; run-file validation. Harness: core_harness.py; fixtures ``clock``, ``make``: conftest.py.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import msgpack
import pytest
import torch

from core_harness import Harness, run_text
from coordinator.commit import applied_as, apply_prepared, prepare_round
from node import wire
from node.compress import SignCodec
from node.errors import ConfigError, PayloadError
from node.recipes import get_recipe
from node.robust.defaults import untrusted_overrides
from node.runfile import parse_run_file
from node.train import state_file
from node.train.reference import AGGREGATE_SENDER, Reference
from node.train.state_file import StateFormatError
from node.transport.messages import RoundResult, RoundStatus

COMPRESSED = {"run": {"recipe": "sign-nesterov"}, "rounds": {"result": "compressed"}}


# -- the oracle ------------------------------------------------------------------------------------------------------
def test_downlink_error_feedback_matches_a_hand_written_oracle_bit_for_bit() -> None:
    """Three rounds of sign-nesterov in compressed mode on a toy model, by hand: the members' sign payloads (±0.5 and
    ±0.25, so every sum below is exact in fp32 whatever its order), their mean A, Q = sign(A + e) with scale
    mean|A + e|, e ← A + e − D(Q), and Nesterov (μ 0.9, lr 0.7) with .grad = D(Q). The coordinator's commit path must
    produce the same frame contents, residual and parameters, bit for bit, and its state must carry the residual."""
    cfg = parse_run_file(run_text(COMPRESSED))
    gen = torch.Generator().manual_seed(7)
    named = [("w", torch.randn(4, 4, generator=gen)), ("b", torch.randn(8, generator=gen))]
    live = Reference(cfg.run, named, downlink_feedback=True)
    codec = SignCodec()  # the recipe's: one f32 scale per tensor, mean reduce
    assert live.codec.params() == codec.params()
    theta = [t.clone() for _, t in named]
    residual = [torch.zeros_like(t) for t in theta]
    momentum: list[torch.Tensor | None] = [None, None]
    for r in range(3):
        signs = {s: [torch.randint(0, 2, t.shape, generator=gen).bool() for t in theta] for s in ("a", "b")}
        magnitude = {"a": 0.5, "b": 0.25}
        frames = {s: wire.pack(cfg.run.run_id, r, s, codec, live.spec,
                               {n: codec.encode(torch.where(b, magnitude[s], -magnitude[s]))
                                for (n, _), b in zip(named, signs[s])}) for s in ("a", "b")}
        before = (live.fingerprint(), [e.clone() for e in live.downlink])
        prepared = prepare_round(live, frames, r, applied_as(cfg))
        # preparing changes nothing (a failed write before the commit point leaves the live state as it was)
        assert live.fingerprint() == before[0] and all(torch.equal(e, o) for e, o in zip(live.downlink, before[1]))
        apply_prepared(live, prepared)
        # the oracle
        sent_bits, sent_scales = [], []
        for i in range(len(theta)):
            a = (torch.where(signs["a"][i], 0.5, -0.5) + torch.where(signs["b"][i], 0.25, -0.25)) / 2  # A
            x = a + residual[i]  # A + e
            scale = x.abs().sum() / x.numel()
            positive = x >= 0
            d = torch.where(positive, scale, -scale)  # D(Q)
            residual[i] = x - d
            if momentum[i] is None:
                momentum[i] = d.clone()
            else:
                momentum[i].mul_(0.9).add_(d)
            theta[i].add_(d.add(momentum[i], alpha=0.9), alpha=-0.7)
            sent_bits.append(positive)
            sent_scales.append(scale)
        got = wire.unpack(prepared.frame, codec, live.spec, cfg.run.run_id, r)
        assert got.sender == AGGREGATE_SENDER
        for i, (name, t) in enumerate(named):
            dec = codec.decode(got.tensors[name], tuple(t.shape))
            assert torch.equal(dec > 0, sent_bits[i]) and torch.equal(dec.abs().max(), sent_scales[i])
            assert torch.equal(live.downlink[i], residual[i]), (r, name)
            assert torch.equal(live.tensors[i], theta[i]), (r, name)
        assert any(bool(e.ne(0).any()) for e in residual)  # the residual carries something: the test is not vacuous
        restored = Reference(cfg.run, named, downlink_feedback=True)
        restored.load_bytes(live.to_bytes())  # what a snapshot holds: the residual rides in the state
        assert all(torch.equal(e, o) for e, o in zip(restored.downlink, residual))
        assert restored.fingerprint() == live.fingerprint()


# -- through the coordinator core ----------------------------------------------------------------------------------
def _round(h: Harness, workers: dict, r: int) -> tuple[bytes, bytes]:
    """Train, submit and apply round ``r`` with every worker; returns (an uplink frame, the aggregate frame)."""
    frames = {}
    for name, w in workers.items():
        w.train()
        frames[name] = w.prepare(r)
        h.submit(name, r, frames[name])
    result, to_send = h.core.collect(h.ids["a"], r, 0.0, True)
    assert to_send == [] and result.aggregate is not None
    # members get the aggregate: the result in memory keeps the senders' names, not their frames (the record does)
    assert result.frames == dict.fromkeys(sorted(workers), b"") and h.store.result(r) == frames
    for w in workers.values():
        report = w.apply(RoundResult(r, RoundStatus.COMMITTED, aggregate=result.aggregate,
                                     aggregate_codec=h.cfg.result_codec, aggregate_members=tuple(result.frames)))
        assert report.committed and report.contributed
    assert all(w.fingerprint() == h.core.reference.fingerprint() == result.fingerprint for w in workers.values())
    return frames["a"], result.aggregate


def test_compressed_mode_keeps_replicas_identical_sends_one_payload_and_survives_a_restart(
        make: Callable[..., Harness]) -> None:
    """Members applying the one sign frame land on the coordinator's fingerprint every round, before and after the
    coordinator restarts from its state dir (the residual restored with it). For the tiny GPT (block 32: 251,520
    parameters in 28 tensors) the downlink frame is exactly 32,459 bytes: 31,440 of packed signs, 28 f32 scales and
    the envelope, unsigned; member a's uplink frame is 32,513 bytes (64 more for its signature, 10 fewer for its
    shorter name), so the downlink is ≤ 1.05× one member's upload (0.998×)."""
    h = make(COMPRESSED)
    assert h.cfg.result_codec == "sign" and h.core.reference.downlink is not None
    ja, jb = h.join("a"), h.join("b")
    workers = {"a": h.worker("a", ja), "b": h.worker("b", jb)}
    for r in range(2):
        up, down = _round(h, workers, r)
    ref = h.core.reference
    payload = sum(math.ceil(math.prod(s.shape) / 8) + 4 for s in ref.spec)
    assert (sum(math.prod(s.shape) for s in ref.spec), len(ref.spec), payload) == (251_520, 28, 31_440 + 4 * 28)
    assert len(down) == wire.expected_size(ref.codec, ref.spec, h.cfg.run.run_id, AGGREGATE_SENDER, 1) == 32_459
    assert len(up) == 32_513 and len(down) <= 1.05 * len(up)
    residual = [e.clone() for e in ref.downlink]
    assert any(bool(e.ne(0).any()) for e in residual)
    h.close()
    h2 = make(COMPRESSED)  # the same state dir
    assert h2.core.reference.fingerprint() == ref.fingerprint()
    assert all(torch.equal(a, b) for a, b in zip(h2.core.reference.downlink, residual))
    h2.ids, h2.keys = h.ids, h.keys  # the same members (restored with the state), signing with the same keys
    _round(h2, workers, 2)


def test_state_served_to_joiners_carries_the_residual_and_a_member_ignores_it(make: Callable[..., Harness]) -> None:
    """The state a joiner fetches is the coordinator's persisted state, residual included (docs/state.md); a member's
    reference checks the residual's entries and loads the rest, landing on the coordinator's fingerprint."""
    h = make(COMPRESSED)
    ja, jb = h.join("a"), h.join("b")
    _round(h, {"a": h.worker("a", ja), "b": h.worker("b", jb)}, 0)
    blob = b"".join(p["data"] for p in h.core.fetch_state(h.ids["a"], 0))
    joiner = h.worker("c", ja)
    assert joiner.reference.downlink is None
    joiner.reference.load_bytes(blob)
    assert joiner.reference.fingerprint() == h.core.reference.fingerprint()
    assert "downlink/" not in str(joiner.reference.state()[1].keys())


def test_sign_vote_works_in_compressed_mode(make: Callable[..., Harness]) -> None:
    """A majority vote's aggregate (±mean scale, 0 on ties) is not a sign payload, but C(A + e) is: the ties and the
    scale mismatch stay in the residual. So the run file is accepted and replicas stay identical."""
    h = make({**COMPRESSED, "recipe": {"H": 1, "codec.params.reduce": "vote"}})
    assert h.core.reference.codec.params()["reduce"] == "vote"
    ja, jb = h.join("a"), h.join("b")
    workers = {"a": h.worker("a", ja), "b": h.worker("b", jb)}
    for r in range(2):
        _round(h, workers, r)


def test_compressed_mode_with_the_robust_reduce_keeps_honest_replicas_identical(make: Callable[..., Harness]) -> None:
    """With ``[recipe.reduce]`` on, the coordinator's bounded, robust aggregate is what gets re-encoded: a member
    sending huge, well-formed frames is rejected at the coordinator, and the honest members applying the compressed
    frame stay on the coordinator's fingerprint."""
    reduce = untrusted_overrides(get_recipe("sign-nesterov"))
    h = make({**COMPRESSED, "recipe": {"H": 1, **reduce}, "membership": {"min_nodes": 3, "max_nodes": 4}})
    joins = {name: h.join(name) for name in ("a", "b", "c", "m")}
    workers = {name: h.worker(name, joins[name]) for name in joins}
    ref = h.core.reference
    for r in range(2):
        for name in ("a", "b", "c"):
            workers[name].train()
            h.submit(name, r, workers[name].prepare(r))
        workers["m"].train()
        env = wire.unpack(workers["m"].prepare(r), ref.codec, ref.spec, h.cfg.run.run_id, r)
        loud = {n: {k: (v * 1e25 if k in ref.codec.magnitude_buffers(enc) else v) for k, v in enc.items()}
                for n, enc in env.tensors.items()}
        h.submit("m", r, wire.pack(h.cfg.run.run_id, r, "m", ref.codec, ref.spec, loud, key=h.key("m")))
        result, _ = h.core.collect(h.ids["a"], r, 0.0, True)
        assert h.core.reference.last_report is not None and "m" not in h.core.reference.last_report.factors
        for name in ("a", "b", "c"):
            report = workers[name].apply(RoundResult(r, RoundStatus.COMMITTED, aggregate=result.aggregate,
                                                     aggregate_codec=h.cfg.result_codec,
                                                     aggregate_members=tuple(result.frames)))
            assert report.committed
            assert workers[name].fingerprint() == h.core.reference.fingerprint() == result.fingerprint
        assert max(float(e.abs().max()) for e in h.core.reference.downlink) < 1e6  # the loud frame did not get in


# -- what a member refuses -------------------------------------------------------------------------------------------
def _tamper_scale(frame: bytes) -> bytes:
    """The frame with its first tensor's scale made negative (an unsigned frame: digest recomputed)."""
    obj = msgpack.unpackb(frame[len(wire.MAGIC):-wire.DIGEST_BYTES], raw=False)
    obj["buffers"][0][1] = torch.tensor([-1.0]).numpy().tobytes()
    packed = msgpack.packb(obj, use_bin_type=True)
    return wire.MAGIC + packed + wire._digest(packed)


def _flip(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 1])


@pytest.mark.parametrize("round_, sender, tamper, codec, message", [
    (1, AGGREGATE_SENDER, _flip, "sign", "payload digest mismatch (truncated or corrupted in transit)"),
    (1, AGGREGATE_SENDER, lambda f: f[:len(f) // 2], "sign", "payload digest mismatch"),
    (1, AGGREGATE_SENDER, _tamper_scale, "sign",
     "tensor 'wte.weight': sign: buffer 'scales' holds negative values (scales are mean magnitudes)"),
    (0, AGGREGATE_SENDER, None, "sign", "payload is for round 0, expected round 1"),
    (1, "mallory", None, "sign", "aggregate frame names sender 'mallory', expected 'coordinator'"),
    (1, AGGREGATE_SENDER, None, "zstd",
     "aggregate codec 'zstd' is neither this run's codec 'sign' nor a dense one (identity, bf16, fp16)"),
    (1, AGGREGATE_SENDER, None, "identity", "payload codec 'sign' v1 differs from this run's 'identity' v1"),
])
def test_a_member_refuses_a_malformed_compressed_aggregate(make: Callable[..., Harness], round_: int, sender: str,
                                                           tamper: Callable | None, codec: str, message: str) -> None:
    """The downlink is input from the network like any frame: checked against the run's codec, model, run and round
    before anything is allocated or applied (node/wire.py); the member names why and its replica does not move."""
    h = make(COMPRESSED)
    ja, jb = h.join("a"), h.join("b")
    workers = {"a": h.worker("a", ja), "b": h.worker("b", jb)}
    _, down = _round(h, workers, 0)
    w = workers["a"]
    before = w.fingerprint()
    w.train()
    w.prepare(1)
    frame = wire.pack(h.cfg.run.run_id, round_, sender, w.reference.codec, w.reference.spec,
                      wire.unpack(down, w.reference.codec, w.reference.spec, h.cfg.run.run_id, 0).tensors)
    bad = tamper(frame) if tamper is not None else frame
    report = w.apply(RoundResult(1, RoundStatus.COMMITTED, aggregate=bad, aggregate_codec=codec,
                                 aggregate_members=("a", "b")))
    assert not report.committed and message in report.rejected["coordinator"]
    assert w.fingerprint() == before


def test_a_member_refuses_a_downlink_with_other_codec_parameters(make: Callable[..., Harness]) -> None:
    """A frame in the run's codec but with other parameters (bf16 scales) is not this run's payload."""
    h = make(COMPRESSED)
    ja = h.join("a")
    w = h.worker("a", ja)
    w.train()
    w.prepare(0)
    other = SignCodec(scale_dtype="bf16")
    frame = wire.pack(h.cfg.run.run_id, 0, AGGREGATE_SENDER, other, w.reference.spec,
                      {s.name: other.encode(torch.ones(s.shape)) for s in w.reference.spec})
    report = w.apply(RoundResult(0, RoundStatus.COMMITTED, aggregate=frame, aggregate_codec="sign",
                                 aggregate_members=("a",)))
    assert not report.committed and "payload codec parameters" in report.rejected["coordinator"]


# -- the run file ----------------------------------------------------------------------------------------------------
def test_run_file_result_modes() -> None:
    assert parse_run_file(run_text(COMPRESSED)).compressed_downlink
    assert parse_run_file(run_text({"rounds": {"result": "aggregate"}})).result_codec == "identity"
    with pytest.raises(ConfigError, match=r"rounds.result must be 'relay', 'aggregate' or 'compressed', got 'dense'"):
        parse_run_file(run_text({"rounds": {"result": "dense"}}))
    with pytest.raises(ConfigError, match=r"rounds.aggregate_codec = 'bf16' is for result = 'aggregate'; result = "
                                          r"'compressed' encodes the aggregate with the recipe's own codec \(sign\)"):
        parse_run_file(run_text({"rounds": {"result": "compressed", "aggregate_codec": "bf16"}}))


def test_a_state_without_residual_starts_one_at_zero_and_a_residual_is_checked() -> None:
    """A state written in relay or aggregate mode resumed in compressed mode: the residual starts at 0. A residual of
    the wrong shape is refused, and nothing changes."""
    cfg = parse_run_file(run_text(COMPRESSED))
    named = [("w", torch.ones(4, 4))]
    plain = Reference(cfg.run, named)
    comp = Reference(cfg.run, named, downlink_feedback=True)
    comp.downlink[0].fill_(3.0)
    comp.load_bytes(plain.to_bytes())
    assert torch.equal(comp.downlink[0], torch.zeros(4, 4))
    header, tensors = copy.deepcopy(comp.state())
    tensors["downlink/w"] = torch.zeros(2, 8)
    comp.downlink[0].fill_(3.0)
    with pytest.raises(StateFormatError, match="downlink/w"):
        comp.load_bytes(state_file.dumps(tensors, header))
    assert torch.equal(comp.downlink[0], torch.full((4, 4), 3.0))
