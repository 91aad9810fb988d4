"""``lowband bench scale``'s load generator against a real coordinator (port 0, gpt tiny): 3 simulated nodes in 2
processes, one warm-up and 2 measured rounds per result mode; the bytes each node sends and receives are exact."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from node import wire
from node.bench.scale import PROBE_STREAMS, RUN_ID, ScaleSettings, measure_setting, scale_run_file
from node.compress import make_codec
from node.runfile import parse_run_file
from node.tasks import load_task
from node.train.reference import AGGREGATE_SENDER

SETTINGS = dict(size="tiny", rounds=2, load_procs=2, round_timeout_s=120.0, start_timeout_s=300.0,
                heartbeat_s=2.0)


def _sizes(mode: str) -> tuple[int, int]:
    """(a node's frame, the aggregate frame) exactly, for rounds 1 and 2 and the names n000..n002."""
    cfg = parse_run_file(scale_run_file(mode, 3, ScaleSettings(**SETTINGS))).run
    task = load_task(cfg.task.name, **cfg.task.params)
    spec = wire.model_spec([(n, p) for n, p in task.build_model(cfg.seed).named_parameters() if p.requires_grad])
    codec = make_codec(cfg.recipe.codec.name, cfg.recipe.codec.params)
    frame = {wire.expected_size(codec, spec, RUN_ID, f"n00{i}", r, signed=True) for i in range(3) for r in (1, 2)}
    aggregate = {wire.expected_size(make_codec("identity"), spec, RUN_ID, AGGREGATE_SENDER, r) for r in (1, 2)}
    assert len(frame) == 1 and len(aggregate) == 1  # one size for every node and round: exact means below
    return frame.pop(), aggregate.pop()


@pytest.mark.parametrize("mode", ["relay", "aggregate"])
def test_every_node_sends_its_frame_and_receives_the_result_every_round(mode: str, tmp_path: Path) -> None:
    frame, aggregate = _sizes(mode)
    row = measure_setting(mode, 3, ScaleSettings(**SETTINGS, tmp_dir=str(tmp_path)))
    assert row.error == "" and row.failed_node_rounds == 0, row.failure  # every node's every round committed
    assert (row.n, row.rounds, row.payload_bytes) == (3, 2, frame)
    assert row.bytes_up_per_node_round == frame
    # relay: the two other members' frames (a node's own is not sent back); aggregate: one dense frame
    assert row.bytes_down_per_node_round == (2 * frame if mode == "relay" else aggregate)
    assert row.cpu_s_per_round >= 0 and row.peak_rss_bytes >= row.start_rss_bytes > 0 and row.collect_retries == 0
    assert 0 < sum(row.rss_breakdown.values()) <= row.peak_rss_bytes
    assert list(tmp_path.iterdir()) == []  # the state dir is gone


def test_a_refused_mode_and_a_capped_relay_are_reported_without_starting_anything(tmp_path: Path) -> None:
    s = ScaleSettings(**SETTINGS, relay_max_nodes=2, tmp_dir=str(tmp_path))
    refused = measure_setting("no-such-result", 3, s)
    assert "this tree refuses [rounds] result = 'no-such-result'" in refused.error
    capped = measure_setting("relay", 3, s)
    assert "relay above --relay-max-nodes 2" in capped.error and capped.payload_bytes > 0
    assert list(tmp_path.iterdir()) == []


def test_the_dht_side_is_dispatched_and_its_rows_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from node.cli import main

    calls = []

    def run_dht_scale(peers: list[int], size: str, rounds: int, out: Path, keep: bool) -> list[dict]:
        calls.append((peers, size, rounds, out, keep))
        return [{"peers": p, "bytes_up_per_peer_round": 10, "bytes_down_per_peer_round": 20, "payload_bytes": 10,
                 "round_latency_s": {"median": 1.0, "p90": 1.5}, "cpu_s_per_round": 0.1, "peak_rss_bytes": 1}
                for p in peers]

    monkeypatch.setitem(sys.modules, "node.bench.scale_dht", types.SimpleNamespace(run_dht_scale=run_dht_scale))
    assert main(["bench", "scale", "--dht", "--peers", "8", "16", "--size", "tiny", "--rounds", "2",
                 "--out", str(tmp_path)]) == 0
    assert calls == [([8, 16], "tiny", 2, tmp_path, False)]
    assert "| dht | dht | 16 |" in (tmp_path / "scale.md").read_text()
    monkeypatch.setitem(sys.modules, "node.bench.scale_dht", None)  # the module is not in the tree: import fails
    assert main(["bench", "scale", "--dht", "--out", str(tmp_path)]) == 2


def test_the_run_file_seats_every_node_and_the_10m_preset_is_about_ten_million_parameters() -> None:
    from node.bench.scale import task_params
    from node.errors import ConfigError

    run = parse_run_file(scale_run_file("aggregate", 256, ScaleSettings(size="10m", keep_results=2,
                                                                        aggregate_codec="bf16")))
    assert (run.result, run.aggregate_codec, run.keep_results) == ("aggregate", "bf16", 2)
    assert run.membership.max_nodes == 256 + PROBE_STREAMS and run.eval_every == 0  # seats for the probes too
    assert run.run.task.params == {"size": "medium", "n_layer": 3, "batch_size": 8}
    model = load_task(run.run.task.name, **run.run.task.params).build_model(0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 9_720_320
    with pytest.raises(ConfigError, match="--size 'huge'"):
        task_params("huge")


def test_a_load_generator_that_cannot_start_is_stopped_within_its_bound() -> None:
    import socket

    from node.bench.loadgen import LoadGenerator, NodeSpec

    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        spec = NodeSpec(address, scale_run_file("relay", 1, ScaleSettings(**SETTINGS)), "{}", "h", "f", "d",
                        names=("n000",), seed=0)
        gen = LoadGenerator([spec], start_timeout_s=5.0, round_timeout_s=5.0)
        with pytest.raises(TimeoutError, match="no 'ready' within 5 s"):
            gen.__enter__()
        assert not any(p.is_alive() for p in gen.procs)
