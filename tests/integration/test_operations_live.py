"""Operations against one live run (a coordinator and two nodes as real processes on 127.0.0.1, every port 0): the
Prometheus metrics of the coordinator and of a node, scraped and parsed with Prometheus' text parser; the dashboard
in headless Chromium (the page loads, its plots render with the run's data and keep updating, no console error);
``lowband status --json`` and a closed pipe; SIGTERM on a node. The run has a join token and a read token, so every
read is authorised the way an operator's would be, and the recommended ``[recipe.reduce]`` (no eviction: two honest
nodes), so every view shows each member's accountability."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from browser import Chromium, find_chromium
from lowband_cluster import Cluster, applied_rounds, coordinator_rounds, printed, wait_for
from node.recipes import get_recipe
from node.robust.defaults import untrusted_overrides
from node.runfile import build_run_file

JOIN, READ = "jt-live-operations", "rt-live-operations"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ops-live")
    run = root / "run.toml"
    run.write_text(build_run_file(
        run_id="ops-live", recipe="sign", rounds=400,
        task_params={"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 2},
        recipe_overrides={"H": 2, "inner.lr": 2e-3, **untrusted_overrides(get_recipe("sign")),
                          "reduce.evict_after": 0},
        membership={"min_nodes": 2, "max_nodes": 8, "heartbeat_s": 0.5, "lease_s": 5.0, "join_token": JOIN,
                    "read_token": READ},
        rounds_policy={"initial_wait_s": 30.0, "min_wait_s": 1.0, "max_wait_s": 30.0, "eval_every": 1}))
    c = Cluster(root)
    try:
        coord = c.coordinator(run, root / "state", extra=("--http-port", "0", "--metrics-port", "0"))
        nodes = [c.node(coord.address, f"n{i}", "--join-token", JOIN, "--metrics-port", "0") for i in range(2)]
        wait_for("three rounds with a validation loss",
                 lambda: sum(1 for r in coordinator_rounds(root / "state") if r.val_loss == r.val_loss) >= 3, 240)
        yield {"root": root, "cluster": c, "coordinator": coord, "nodes": nodes,
               "dashboard": printed(coord, "lowband coordinator dashboard on "),
               "metrics": printed(coord, "lowband coordinator metrics on ")}
    finally:
        c.stop_all()


def _get(url: str, token: str | None = READ) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], metric: str, suffix: str = "", **labels: str) -> float:
    family = families[metric]
    for sample in family.samples:
        if sample.name == metric + suffix and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"{metric}{suffix} {labels} not in {[s.name for s in family.samples]}")


def test_the_coordinators_metrics_are_prometheus_text_with_the_runs_numbers(live: dict[str, Any]) -> None:
    assert _get(live["metrics"], token=None)[0] == 401  # the read token guards them, as it guards Status
    code, headers, body = _get(live["metrics"])
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    fam = _families(body.decode())
    committed = _value(fam, "lowband_rounds_committed", "_total")
    assert committed >= 3
    assert _value(fam, "lowband_round_seconds", "_count") == committed - 1  # a period needs two commits
    assert _value(fam, "lowband_round_spread_seconds", "_count") == committed
    assert _value(fam, "lowband_bytes_received", "_total") > 0
    assert _value(fam, "lowband_bytes_sent", "_total") > 0
    assert _value(fam, "lowband_members") == 2
    assert _value(fam, "lowband_compression_ratio") > 10  # 1-bit signs against dense fp32
    assert 0 < _value(fam, "lowband_validation_loss") < 10
    assert _value(fam, "lowband_persistence_ok") == 1
    for name in ("n0", "n1"):
        assert _value(fam, "lowband_member_rounds_contributed", "_total", member=name) >= 1
        assert _value(fam, "lowband_member_heartbeat_age_seconds", member=name) >= 0
    assert fam["lowband_frames_late"].type == "counter"
    # [recipe.reduce]: each member's accountability (two honest members: a norm ratio, nothing rejected or evicted)
    for name in ("n0", "n1"):
        assert _value(fam, "lowband_member_norm_ratio", member=name) > 0
        assert _value(fam, "lowband_member_frames_rejected", "_total", member=name) == 0
        assert _value(fam, "lowband_member_evicted", member=name) == 0
    assert _value(fam, "lowband_members_evicted", "_total") == 0
    # the dashboard's port serves the same metrics
    code, _, body = _get(live["dashboard"] + "metrics")
    assert code == 200 and "lowband_rounds_committed_total" in body.decode()


def test_a_nodes_metrics_come_from_its_round_records(live: dict[str, Any]) -> None:
    node = live["nodes"][0]
    url = wait_for("node n0's metrics address", lambda: next(
        (m.group(1) for m in [re.search(r"lowband node metrics on (\S+)", node.log_text())] if m), None), 60)
    wait_for("node n0 to apply two rounds", lambda: len(applied_rounds(node.workdir)) >= 2, 120)
    code, _, body = _get(url, token=None)
    assert code == 200
    fam = _families(body.decode())
    applied = [e for e in applied_rounds(node.workdir)]
    assert _value(fam, "lowband_rounds_committed", "_total", contributed="true") >= 1
    sent = _value(fam, "lowband_bytes_sent", "_total")
    assert sent >= sum(e.get("bytes_out", 0) for e in applied[:1]) > 0
    assert _value(fam, "lowband_round_seconds", "_count") >= 1
    assert _value(fam, "lowband_compression_ratio") > 10
    assert _value(fam, "lowband_inner_steps_per_second") > 0
    assert 0 <= _value(fam, "lowband_communication_ratio") <= 1
    assert _value(fam, "lowband_train_loss") > 0
    assert _value(fam, "lowband_join_seconds") > 0
    assert _value(fam, "lowband_nonfinite_steps_skipped", "_total") == 0
    assert _value(fam, "lowband_node_info", name="n0") == 1


def test_the_dashboard_renders_the_live_run_in_headless_chromium(live: dict[str, Any], tmp_path: Path) -> None:
    import aiohttp

    if find_chromium() is None:
        if os.environ.get("LOWBAND_REQUIRE_BROWSER"):
            pytest.fail("LOWBAND_REQUIRE_BROWSER is set (.ci/run installed Chromium) but no chromium is on PATH")
        pytest.skip("no Chromium on this machine: `apt-get install chromium` (.ci/run does), or $LOWBAND_CHROMIUM")

    async def look() -> dict[str, Any]:
        browser = Chromium(find_chromium() or "", tmp_path / "chromium.log")
        try:
            async with aiohttp.ClientSession() as session:
                page = await browser.page(session)
                await page.call("Page.navigate", url=live["dashboard"] + "#token=" + READ)
                await page.wait_until("window.lowbandDashboard && window.lowbandDashboard.updates > 0", 60,
                                      "the first update")
                first = await page.evaluate("Number(document.getElementById('plot-time').dataset.points)")
                # the run goes on: the plots take its new rounds without a reload
                await page.wait_until(f"Number(document.getElementById('plot-time').dataset.points) > {first}", 120,
                                      "the round-time plot to grow")
                seen = await page.evaluate("""(() => {
                    const plot = (id) => {
                      const el = document.getElementById(id);
                      const canvas = el.querySelector('canvas');
                      return {points: Number(el.dataset.points), canvas: canvas ? [canvas.width, canvas.height] : null};
                    };
                    const u = window.lowbandDashboard.plots['plot-loss'];
                    return {
                      loss: plot('plot-loss'), time: plot('plot-time'), bytes: plot('plot-bytes'),
                      lossValues: u ? u.data[1].filter((v) => v !== null).length : 0,
                      members: [...document.querySelectorAll('#members tbody tr td:first-child')].map((td) => td.textContent),
                      // the accountability columns, shown: [recipe.reduce] is on
                      acct: [...document.querySelectorAll('#members thead th.acct')].map(
                        (th) => [th.textContent, getComputedStyle(th).display]),
                      frames: [...document.querySelectorAll('#members tbody tr')].map(
                        (tr) => Number(tr.querySelector('td.acct').textContent)),
                      evictedHidden: document.getElementById('evicted-section').hidden,
                      recent: document.querySelectorAll('#recent tbody tr').length,
                      round: document.getElementById('round').textContent,
                      loginHidden: document.getElementById('login').hidden,
                      token: window.location.hash,
                    };
                })()""")
                await page.screenshot(tmp_path / "dashboard.png")
                seen["problems"] = page.problems
                return seen
        finally:
            browser.close()

    seen = asyncio.run(look())
    assert seen["problems"] == [], seen["problems"]
    assert seen["loginHidden"] and seen["token"] == ""  # the token was taken from the link, and the link cleaned
    assert seen["loss"]["points"] >= 2 and seen["lossValues"] >= 2
    assert seen["time"]["points"] >= 3 and seen["bytes"]["points"] >= 3
    for plot in ("loss", "time", "bytes"):
        assert seen[plot]["canvas"] is not None and min(seen[plot]["canvas"]) > 0
    assert sorted(seen["members"]) == ["n0", "n1"]
    assert [name for name, _ in seen["acct"]] == ["frames", "clipped", "rejected", "norm ratio", "cosine"]
    assert all(display != "none" for _, display in seen["acct"]), seen["acct"]
    assert all(n >= 1 for n in seen["frames"]), seen["frames"]
    assert seen["evictedHidden"]
    assert seen["recent"] >= 3
    assert "open" in seen["round"]


def test_status_json_writes_numbers_as_numbers(live: dict[str, Any]) -> None:
    out = subprocess.run([sys.executable, "-m", "node.cli", "status", "--coordinator", live["coordinator"].address,
                          "--json", "--read-token", READ], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert isinstance(s["committed_rounds"], int) and s["committed_rounds"] >= 3
    assert isinstance(s["current_round"], int)
    member = s["members"][0]
    for key in ("bytes_in", "bytes_out", "rounds_contributed", "first_round"):
        assert isinstance(member[key], int), (key, member[key])
    assert isinstance(member["last_heartbeat_age_s"], float)
    # [recipe.reduce]: accountability per member, numbers too
    for key in ("frames_seen", "frames_clipped", "frames_rejected"):
        assert isinstance(member[key], int), (key, member[key])
    assert member["frames_seen"] >= 1 and member["frames_rejected"] == 0
    assert isinstance(member["norm_ratio"], float) and member["norm_ratio"] > 0
    assert member["cosine"] is None or isinstance(member["cosine"], float)
    assert s["evicted"] == []
    assert all(isinstance(r["bytes_in"], int) and (r["val_loss"] is None or isinstance(r["val_loss"], float))
               for r in s["recent_rounds"])


def test_status_into_a_closed_pipe_ends_quietly(live: dict[str, Any]) -> None:
    """``lowband status | head -0``: the reader is gone before status writes a byte; no traceback."""
    read, write = os.pipe()
    os.close(read)  # nobody will read: every write fails with EPIPE
    try:
        out = subprocess.run([sys.executable, "-m", "node.cli", "status", "--coordinator",
                              live["coordinator"].address, "--read-token", READ], stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_sigterm_on_a_node_prints_one_line_and_it_leaves(live: dict[str, Any]) -> None:
    node = live["nodes"][1]
    before = len(node.log_text().splitlines())
    os.killpg(node.pid, signal.SIGTERM)
    assert node.wait_exit(120) == 0
    after = node.log_text().splitlines()[before:]
    said = [line for line in after if "SIGTERM" in line]
    assert len(said) == 1, after
    assert "checkpoint, leave and exit 0" in said[0]
