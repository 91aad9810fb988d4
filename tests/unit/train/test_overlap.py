"""Overlapped rounds (``recipe.overlap``): round r's result is applied after round r+1's inner steps and the
local model is shifted by θ ← θ + (θ_ref_{r+1} − θ_ref_r) + Δ_r; θ_ref follows the same outer rule as without
overlap, so replicas stay identical. Toy task and hand-driven cluster: recipe_oracle_harness.py."""
from __future__ import annotations

import pytest

from node.errors import ConfigError
from node.train.simulate import simulate
from recipe_oracle_harness import TASK, Cluster, assert_all_close, config, local_params, refs


def test_the_late_result_shifts_the_local_model_by_what_the_round_changed() -> None:
    cl = Cluster(config("diloco", {"overlap": True}, workers=2, rounds=4))
    plain = Cluster(config("diloco", workers=2, rounds=4))
    cl.train_prepare(0)
    plain.round(0)
    for w, link, frame in zip(cl.workers, cl.links, cl.frames):
        link.submit(0, frame)
    results = [link.collect(0) for link in cl.links]
    for w, res in zip(cl.workers, results):
        w.train()  # round 1 trains before round 0 is applied
        assert w.pending is not None
        delta0 = [d.clone() for d in w.pending.deltas]
        before, ref_old = local_params(w), refs(w)
        report = w.apply(res)
        assert report.committed and report.contributed
        ref_new = refs(w)
        expected = [p + (n - o) + d for p, n, o, d in zip(before, ref_new, ref_old, delta0)]
        assert_all_close(local_params(w), expected)
        # round 0 started from the same θ with the same data in both clusters: the same outer step
        assert_all_close(ref_new, refs(plain.workers[cl.workers.index(w)]), atol=0, rtol=0)
        # round 1's Δ is only the progress made in round 1
        w.prepare(1)
        assert w.pending is not None
        assert_all_close(w.pending.deltas, [n - p for n, p in zip(ref_new, local_params(w))])


def test_an_uncommitted_round_leaves_the_local_model_alone() -> None:
    cl = Cluster(config("sign", {"overlap": True}, workers=2, rounds=4), min_members=3)  # never enough members
    cl.train_prepare(0)
    for link, frame in zip(cl.links, cl.frames):
        link.submit(0, frame)
    results = [link.collect(0) for link in cl.links]
    for w, res in zip(cl.workers, results):
        w.train()
        before, ref_before = local_params(w), refs(w)
        assert not w.apply(res).committed
        assert_all_close(local_params(w), before, atol=0, rtol=0)
        assert_all_close(refs(w), ref_before, atol=0, rtol=0)


@pytest.mark.parametrize("recipe", ["diloco", "sign", "dct-consistent"])
def test_overlapped_simulation_keeps_replicas_identical_and_learns_about_as_well(recipe: str) -> None:
    cfg = config(recipe, {"overlap": True}, workers=3, rounds=8, lr=0.02)
    start = TASK.evaluate(TASK.build_model(cfg.seed))
    lagged = simulate(cfg, task=TASK, eval_every=4)
    sync = simulate(config(recipe, workers=3, rounds=8, lr=0.02), task=TASK)
    assert all(rec.replicas_identical for rec in lagged.history if rec.val_loss is not None)
    assert sync.final_val_loss < start
    # the one-round delay costs less than a tenth of the progress the synchronous run makes
    assert lagged.final_val_loss <= sync.final_val_loss + 0.1 * (start - sync.final_val_loss), \
        (lagged.final_val_loss, sync.final_val_loss, start)


def test_overlap_differs_from_the_synchronous_run_only_through_the_delay() -> None:
    sync = simulate(config("diloco", workers=2, rounds=3), task=TASK)
    lagged = simulate(config("diloco", {"overlap": True}, workers=2, rounds=3), task=TASK)
    assert sync.bytes_sent_per_worker == lagged.bytes_sent_per_worker  # the same frames travel
    assert sync.final_val_loss != lagged.final_val_loss  # but rounds ≥ 1 start from stale points


def test_overlap_needs_local_steps() -> None:
    with pytest.raises(ConfigError, match="overlap needs local steps"):
        config("ddp", {"overlap": True})
    with pytest.raises(ConfigError, match="overlap must be true or false"):
        config("sign", {"overlap": "yes"})
