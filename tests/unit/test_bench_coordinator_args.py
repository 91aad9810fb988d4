"""``lowband bench coordinator``'s settings (issue 20): the run admits as many members as the largest node count
(or --max-nodes), the result mode and the coordinator's torch threads are flags; ``lowband coordinator
--torch-threads`` parses. No process is started here (tests/integration/test_coordinator_threads.py does)."""
from __future__ import annotations

import pytest

from node.bench.coordinator import bench_max_nodes
from node.bench.fake_nodes import protocol_run_file
from node.cli import build_parser
from node.runfile import parse_run_file


def test_max_nodes_is_the_largest_node_count_unless_given() -> None:
    assert bench_max_nodes([3, 16]) == 16
    assert bench_max_nodes([256, 4]) == 256
    assert bench_max_nodes([3, 16], 100) == 100
    with pytest.raises(ValueError, match="below the largest node count 16"):
        bench_max_nodes([3, 16], 8)


def test_the_bench_run_file_carries_max_nodes_and_the_result_mode() -> None:
    relay = parse_run_file(protocol_run_file("sign", "tiny", max_nodes=300))
    assert relay.membership.max_nodes == 300
    assert (relay.result, relay.aggregate_codec) == ("relay", "identity")
    aggregate = parse_run_file(protocol_run_file("sign", "tiny", max_nodes=5, result="aggregate",
                                                 aggregate_codec="bf16"))
    assert (aggregate.membership.max_nodes, aggregate.result, aggregate.aggregate_codec) == (5, "aggregate", "bf16")


def test_bench_coordinator_flags_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "coordinator", "--nodes", "3", "100", "--result", "aggregate",
                              "--aggregate-codec", "bf16", "--torch-threads", "2", "--max-nodes", "128", "--keep"])
    assert (args.nodes, args.result, args.aggregate_codec, args.torch_threads, args.max_nodes, args.keep) == \
        ([3, 100], "aggregate", "bf16", 2, 128, True)
    default = parser.parse_args(["bench", "coordinator"])
    assert (default.result, default.aggregate_codec, default.torch_threads, default.max_nodes, default.keep) == \
        ("relay", "identity", 1, None, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "coordinator", "--result", "gossip"])


def test_coordinator_torch_threads_flag_defaults_to_one() -> None:
    parser = build_parser()
    base = ["coordinator", "--state-dir", "s", "--run", "r.toml"]
    assert parser.parse_args(base).torch_threads == 1
    assert parser.parse_args(base + ["--torch-threads", "4"]).torch_threads == 4
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--torch-threads", "0"])


def test_bench_codecs_flags_parse() -> None:
    args = build_parser().parse_args(["bench", "codecs", "--numel", "10000000", "--codecs", "sign", "--repeats", "5",
                                      "--reduce-members", "8"])
    assert (args.numel, args.codecs, args.repeats, args.reduce_members) == (10_000_000, ["sign"], 5, 8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "codecs", "--codecs", "topk"])
