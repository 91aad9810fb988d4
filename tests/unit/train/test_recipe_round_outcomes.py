"""Recipe rounds through the real Worker round code on a tiny deterministic toy task: replica identity
(oracle 13, docs/algorithms.md §8), rounds committed without a worker or not committed, rejected frames, and
recipe config validation.
Toy task, configs and the hand-driven cluster: recipe_oracle_harness.py."""
from __future__ import annotations

import pytest
import torch

from node.errors import ConfigError
from node.recipes import make_run_config
from recipe_oracle_harness import Cluster, assert_all_close, config, local_params, refs


# -- oracle 13: replica identity --------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["dsm", "sign", "diloco", "dct-consistent", "demo", "ddp"])
def test_replica_identity(recipe: str) -> None:
    cl = Cluster(config(recipe, workers=3, rounds=3))
    assert all(w.replica_consistent for w in cl.workers)
    start = cl.prints()
    for r in range(3):
        cl.train_prepare(r)
        if cl.workers[0].inner.optimizer is not None:  # the local models really differ before the exchange
            locals_ = [local_params(w)[0] for w in cl.workers]
            assert not torch.equal(locals_[0], locals_[1])
        reports = cl.exchange(r)
        assert all(rep.committed and rep.members == ("w0", "w1", "w2") for rep in reports)
        prints = cl.prints()
        assert len(set(prints)) == 1, prints
        for w in cl.workers:
            assert_all_close(local_params(w), refs(w), atol=0, rtol=0)
    assert prints != start


def test_faithful_dct_replicas_drift() -> None:
    cl = Cluster(config("dct", workers=3, rounds=3))
    assert not any(w.replica_consistent for w in cl.workers)
    for r in range(3):
        cl.round(r)
        assert len(set(cl.prints())) == 3


# -- round outcomes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["sign", "dct-consistent", "diloco"])
def test_round_committed_without_a_worker(recipe: str) -> None:
    cl = Cluster(config(recipe, workers=3, rounds=3))
    cl.round(0)
    cl.train_prepare(1)
    wanted = [[u.clone() for u in w.pending.wanted] for w in cl.workers]
    reports = cl.exchange(1, skip=("w2",))
    assert all(rep.committed and rep.members == ("w0", "w1") for rep in reports)
    assert [rep.contributed for rep in reports] == [True, True, False]
    assert len(set(cl.prints())) == 1  # w2 applied the others' aggregate: replicas stay identical
    w2 = cl.workers[2]
    if cl.cfg.recipe.feedback_decay is not None:
        assert_all_close([w2.feedback.residuals[nm] for nm in w2.names], wanted[2], atol=0, rtol=0)  # kept all of u
        w0 = cl.workers[0]
        assert not torch.equal(w0.feedback.residuals[w0.names[0]], wanted[0][0])  # contributors kept only u − sent
        # next round: the kept update is added back before encoding
        kept = [w2.feedback.residuals[nm].clone() for nm in w2.names]
        before = refs(w2)
        cl.train_prepare(2)
        scale = 1.0 / cl.lrs[2] if cl.cfg.recipe.payload_scale == "inverse_inner_lr" else 1.0
        x = [(b - p) * scale for b, p in zip(before, local_params(w2))]
        decay = cl.cfg.recipe.feedback_decay
        assert_all_close(w2.pending.wanted, [decay * e + xi for e, xi in zip(kept, x)])
        reports = cl.exchange(2)
        assert all(rep.contributed for rep in reports)
        assert len(set(cl.prints())) == 1


@pytest.mark.parametrize("recipe", ["sign", "diloco"])
def test_round_not_committed_changes_nothing(recipe: str) -> None:
    cl = Cluster(config(recipe, workers=3, rounds=3), min_members=3)
    cl.round(0, skip=())  # all three: commits
    ref0 = [refs(w) for w in cl.workers]
    res0 = [w.feedback.state_dict() for w in cl.workers]
    cl.train_prepare(1)
    trained = [local_params(w) for w in cl.workers]
    reports = cl.exchange(1, skip=("w2",))
    assert all(not rep.committed and not rep.contributed for rep in reports)
    for i, w in enumerate(cl.workers):
        assert_all_close(refs(w), ref0[i], atol=0, rtol=0)
        assert_all_close(local_params(w), trained[i], atol=0, rtol=0)  # the model keeps training from here
        state = w.feedback.state_dict()
        assert state.keys() == res0[i].keys()
        assert all(torch.equal(state[k], res0[i][k]) for k in state)
    # the next round's Δ covers both rounds of local work
    before = refs(cl.workers[0])
    cl.train_prepare(2)
    assert_all_close(cl.workers[0].pending.deltas, [b - p for b, p in zip(before, local_params(cl.workers[0]))],
                     atol=0, rtol=0)
    reports = cl.exchange(2)
    assert all(rep.committed for rep in reports)
    assert len(set(cl.prints())) == 1


@pytest.mark.parametrize("recipe", ["sign", "diloco", "dct-consistent"])
def test_corrupted_frame_is_rejected_by_everyone(recipe: str) -> None:
    cl = Cluster(config(recipe, workers=3, rounds=1))
    frames = cl.train_prepare(0)
    bad = bytearray(frames[1])
    bad[len(bad) // 2] ^= 0x40
    reports = cl.exchange(0, replace={"w1": bytes(bad)})
    for rep in reports:
        assert rep.committed
        assert rep.members == ("w0", "w2")
        assert set(rep.rejected) == {"w1"} and "digest" in rep.rejected["w1"]
    assert [rep.contributed for rep in reports] == [True, False, True]
    assert len(set(cl.prints())) == 1
    # everyone applied exactly the aggregate of w0 and w2
    expect = Cluster(config(recipe, workers=3, rounds=1))
    expect.train_prepare(0)
    expect.exchange(0, skip=("w1",))
    assert cl.prints()[0] == expect.prints()[0]


def test_frame_claiming_another_sender_is_rejected() -> None:
    cl = Cluster(config("diloco", workers=3, rounds=1))
    frames = cl.train_prepare(0)
    reports = cl.exchange(0, replace={"w2": frames[0]})  # w2 forwards w0's frame as its own
    for rep in reports:
        assert rep.members == ("w0", "w1") and "w2" in rep.rejected and "sender" in rep.rejected["w2"]
    assert len(set(cl.prints())) == 1


# -- config validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe,overrides,match", [
    ("ddp", {"H": 4}, "H must be 1"),
    ("demo", {"H": 2}, "H must be 1"),
    ("dct", {"feedback_decay": 0.8}, "feedback_decay"),
    ("dct", {"feedback_decay": None}, "feedback_decay"),
    ("dct", {"outer.momentum": 0.8}, "outer.momentum"),
    ("sign", {"codec.bogus": 1}, "bogus"),
    ("dct", {"codec.values": "f64"}, "values"),
    ("diloco", {"outer.nesterov": True}, "bad parameters"),
    ("diloco", {"inner.bogus": 1}, "unknown setting 'inner.bogus'"),
    ("diloco", {"bogus": 1}, "unknown setting 'bogus'"),
    ("diloco", {"H": 0}, "H must be"),
    ("sign", {"inner.min_lr_ratio": 0.0}, "min_lr_ratio"),
    ("diloco", {"inner.optimizer": "lion"}, "inner.optimizer"),
])
def test_invalid_configs_raise_config_error(recipe: str, overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_run_config(recipe, overrides)


def test_unknown_recipe() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'dilco'"):
        make_run_config("dilco")


@pytest.mark.parametrize("overrides", [{"feedback_decay": 0.8, "outer.momentum": 0.8},
                                       {"outer.momentum": 0.8, "feedback_decay": 0.8}])
def test_dct_feedback_and_momentum_changed_together_is_valid(overrides: dict) -> None:
    """Coupled settings are validated on the final combination, in either order."""
    cfg = make_run_config("dct", overrides)
    assert cfg.recipe.feedback_decay == 0.8 and cfg.recipe.outer.params["momentum"] == 0.8


def test_config_type_error_becomes_config_error() -> None:
    with pytest.raises(ConfigError, match="H must be an integer"):
        make_run_config("diloco", {"H": "many"})
    with pytest.raises(ConfigError, match="malformed field"):
        make_run_config("diloco", {"inner.betas": 3})
