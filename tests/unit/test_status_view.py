"""``lowband status``'s views of a Status answer: JSON with numbers as numbers (never the strings proto3's JSON
mapping makes of 64-bit integers) and NaN as null; the text table."""
from __future__ import annotations

import json
import math

from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.status import status_json, status_text


def _status() -> pb.StatusResponse:
    return pb.StatusResponse(
        run_id="r", recipe="sign", current_round=7, committed_rounds=7, deadline_in_s=-1.0,
        members=[pb.MemberStatus(name="n0", key_id="ab" * 8, last_heartbeat_age_s=0.25, rounds_contributed=6,
                                 first_round=0, bytes_in=2**40, bytes_out=5, last_loss=float("nan"),
                                 capabilities=["device=cpu"])],
        recent_rounds=[pb.RoundStatus(round=6, members=["n0"], bytes_in=10, bytes_out=0, duration_s=0.5,
                                      mean_loss=2.5, val_loss=float("nan"), reason="all submitted")],
        reference_fingerprint="f" * 16, submitted=[], persistence_error="")


def test_json_numbers_are_numbers_and_nan_is_null() -> None:
    view = json.loads(json.dumps(status_json(_status()), allow_nan=False))
    assert view["current_round"] == 7 and isinstance(view["committed_rounds"], int)
    member = view["members"][0]
    assert member["bytes_in"] == 2**40 and isinstance(member["bytes_in"], int)  # int64: a string in proto3 JSON
    assert member["last_loss"] is None
    assert math.isclose(member["last_heartbeat_age_s"], 0.25)
    assert member["capabilities"] == ["device=cpu"]
    assert "node_id" not in member  # deprecated, never set: not shown
    assert view["recent_rounds"][0]["members"] == ["n0"] and view["recent_rounds"][0]["val_loss"] is None
    assert view["submitted"] == [] and view["persistence_error"] == ""


def test_text_shows_the_members_and_rounds() -> None:
    text = "\n".join(status_text(_status()))
    assert "round 7 open" in text and "not set (no payload yet)" in text
    assert "1,099,511,627,776" in text  # bytes in, grouped
    assert "all submitted" in text


def test_a_serverless_runs_status_is_the_same_view_with_what_only_a_dht_knows() -> None:
    from node.status import dht_view, status_lines
    from node.transport.dht_status import DhtStatus, MemberRow, RoundRow

    d = DhtStatus("dht-run", "cd" * 8, False, 5,
                  [MemberRow("d0", "ab" * 8, "live", 0, 0, 0, 0.5, 0), MemberRow("d1", "ef" * 8, "left", 1, 2, 0,
                                                                                   None, 3)],
                  [RoundRow(4, ["d0", "d1"], "committed by d0", ["d0", "d1"]), RoundRow(5, ["d0"], "open")],
                  {"bad signature": 2})
    view = json.loads(json.dumps(dht_view(d, "sign"), allow_nan=False))
    coordinator = status_json(_status())
    assert set(coordinator) <= set(view)  # every field of the coordinator's view, by the same names
    assert set(coordinator["members"][0]) <= set(view["members"][0])
    assert set(coordinator["recent_rounds"][0]) <= set(view["recent_rounds"][0])
    assert view["current_round"] == 5 and view["committed_rounds"] == 5 and view["submitted"] == ["d0"]
    assert view["members"][0]["last_heartbeat_age_s"] == 0.5 and view["members"][1]["last_heartbeat_age_s"] is None
    assert view["members"][1]["status"] == "left" and view["members"][1]["records_ignored"] == 3
    assert view["recent_rounds"][0]["reason"] == "committed by d0" and view["records_ignored"] == {"bad signature": 2}
    assert view["members"][0]["bytes_in"] is None  # a DHT does not count bytes
    text = "\n".join(status_lines(view))
    assert text.splitlines()[0].startswith("run dht-run  recipe sign  round 5 open  5 committed  deadline none")
    assert "closed run" in text and "bad signature (2)" in text
    header = next(line for line in status_text(_status()) if line.startswith("member"))
    assert header in text  # the same table, with the DHT's columns after it
    assert "committed by d0" in text and "  left" in text


def test_accountability_with_reduce_on_is_in_json_and_text() -> None:
    s = _status()
    s.members[0].frames_seen, s.members[0].frames_clipped, s.members[0].frames_rejected = 6, 2, 1
    s.members[0].norm_ratio, s.members[0].cosine = 3.5, -0.25
    s.members.add(name="n1", key_id="cd" * 8, norm_ratio=float("nan"), cosine=float("nan"))  # no frame yet
    s.evicted.add(name="m", round=4, reason="4 of its last 4 frames were clipped or rejected")
    view = json.loads(json.dumps(status_json(s), allow_nan=False))
    n0, n1 = view["members"]
    assert (n0["frames_seen"], n0["frames_clipped"], n0["frames_rejected"], n0["norm_ratio"], n0["cosine"]) == \
        (6, 2, 1, 3.5, -0.25)
    assert (n1["frames_seen"], n1["norm_ratio"], n1["cosine"]) == (0, None, None)
    assert view["evicted"] == [{"name": "m", "round": 4, "reason": "4 of its last 4 frames were clipped or rejected"}]
    lines = status_text(s)
    assert any(line.split() == ["n0", "6", "2", "1", "3.5", "-0.25"] for line in lines), lines
    assert any(line.split() == ["n1", "0", "0", "0", "-", "-"] for line in lines), lines
    assert "evicted: m at round 4: 4 of its last 4 frames were clipped or rejected" in lines


def test_no_accountability_table_with_reduce_off() -> None:
    assert not any("clipped" in line for line in status_text(_status()))


def test_a_finished_run_says_so_and_a_running_one_counts_against_its_length() -> None:
    running = _status()
    running.total_rounds = 10
    assert "round 7 open  7 of 10 committed" in "\n".join(status_text(running))
    done = _status()
    done.committed_rounds, done.current_round, done.total_rounds = 10, 10, 10
    text = "\n".join(status_text(done))
    assert "finished: all 10 rounds committed" in text and "open" not in text.splitlines()[0]
    assert status_json(done)["total_rounds"] == 10
    older = _status()  # a coordinator before the field: 0, the length unknown
    assert "round 7 open  7 committed" in "\n".join(status_text(older))
