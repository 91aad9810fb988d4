"""Workers with ``reduce`` on: a clipped frame of ours leaves e = u − f·decode(sent) in the residual, a rejected one all
of u; every replica applies the same bounded aggregate; the knobs live in the config (hash, run file)."""
from __future__ import annotations

import torch

from node.config import run_config_from_dict
from node.recipes import make_run_config
from node.runfile import build_run_file, parse_run_file
from node.tasks import load_task
from node.train.worker import Worker
from node.transport.inprocess import InProcessHub
from robust_harness import KEYS, LINEAR, run_config


def _round(cfg, attack: float) -> tuple[list[Worker], dict]:
    task = load_task(LINEAR.name, **LINEAR.params)
    workers = [Worker(n, cfg, task, i, 4, key=KEYS[n]) for i, n in enumerate("abcd")]
    hub = InProcessHub()
    links = [hub.connect(w.name, KEYS[w.name].public) for w in workers]
    for w, link in zip(workers, links):
        w.train()
        link.submit(0, w.prepare(0, transform=(lambda xs: [x * attack for x in xs]) if w.name == "d" else None))
    pending = {w.name: w.pending for w in workers}
    reports = [w.apply(link.collect(0)) for w, link in zip(workers, links)]
    assert all(r.committed for r in reports)
    return workers, pending


def test_a_clipped_frame_keeps_what_the_clip_cut_off_in_error_feedback() -> None:
    workers, pending = _round(run_config("sign", task=LINEAR, bound="clip", bound_ratio=2.0), attack=100.0)
    report = workers[0].reference.last_report
    assert report is not None and report.kept == ("a", "b", "c", "d")
    f = report.factors["d"][0]
    assert 0 < f < 0.1  # about 2 / 100
    codec = workers[0].codec
    for w in workers:
        p = pending[w.name]
        u, enc = p.wanted[0], p.encoded["w"]
        factor = report.factors[w.name][0]
        sent = codec.decode(codec.scaled(enc, (3,), factor), (3,))
        assert torch.allclose(w.feedback.residuals["w"], u - sent, atol=1e-6), w.name
    assert len({w.fingerprint() for w in workers}) == 1


def test_a_rejected_frame_keeps_all_of_u_and_did_not_contribute() -> None:
    workers, pending = _round(run_config("sign", task=LINEAR, bound="reject", bound_ratio=2.0), attack=100.0)
    report = workers[0].reference.last_report
    assert report.kept == ("a", "b", "c") and report.members["d"].rejected
    d = workers[3]
    assert torch.equal(d.feedback.residuals["w"], pending["d"].wanted[0])
    assert len({w.fingerprint() for w in workers}) == 1


def test_reduce_settings_change_the_config_hash_only_when_set_and_travel_in_run_files() -> None:
    plain = make_run_config("sign")
    assert "reduce" not in plain.to_dict()["recipe"]
    robust = make_run_config("sign", {"reduce.bound": "clip", "reduce.robust": "vote"})
    assert robust.config_hash() != plain.config_hash()
    assert run_config_from_dict(robust.to_dict()) == robust and run_config_from_dict(plain.to_dict()) == plain
    text = build_run_file(run_id="r", recipe="sign", rounds=5,
                          recipe_overrides={"reduce.bound": "clip", "reduce.robust": "vote", "reduce.evict_after": 4})
    assert "[recipe.reduce]" in text or "reduce" in text
    parsed = parse_run_file(text).run.recipe.reduce
    assert (parsed.bound, parsed.robust, parsed.evict_after) == ("clip", "vote", 4)
    nested = parse_run_file('[run]\nid = "r"\nrecipe = "dct-consistent"\n[recipe.reduce]\nbound = "reject"\n'
                            'robust = "clipped_selector_mean"\n').run.recipe.reduce
    assert (nested.bound, nested.robust) == ("reject", "clipped_selector_mean")


def test_recipes_refuse_modes_their_codec_cannot_run() -> None:
    import pytest

    from node.errors import ConfigError

    with pytest.raises(ConfigError, match="reduce.robust = clipped_selector_mean works on dct_topk payloads"):
        make_run_config("sign", {"reduce.robust": "clipped_selector_mean"})
    with pytest.raises(ConfigError, match="the faithful decoupled rule"):
        make_run_config("dct", {"reduce.bound": "clip"})
    assert make_run_config("sign", {"reduce.robust": "median"}).recipe.reduce.robust == "median"


def test_the_recommended_settings_are_valid_for_every_replica_consistent_recipe() -> None:
    from node.recipes import RECIPES, get_recipe
    from node.robust.defaults import untrusted, untrusted_overrides

    for name in RECIPES:
        if name == "dct":  # replicas drift by design: there is no agreed aggregate to bound
            continue
        reduce = make_run_config(name, untrusted_overrides(get_recipe(name))).recipe.reduce
        assert reduce.bound == "clip" and reduce.evict_after == 4, name
    assert untrusted("sign")["robust"] == "vote" and untrusted("identity")["robust"] == "trimmed_mean"
    assert untrusted("dct_topk")["robust"] == "clipped_selector_mean" and untrusted("sparse_topk")["robust"] == "none"
