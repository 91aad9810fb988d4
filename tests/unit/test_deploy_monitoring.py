"""deploy/'s monitoring files fit what lowband exports: every metric the Grafana dashboard queries is one the
coordinator or a node exposes, the scrape config reaches the ports the compose file gives them, and the compose file
runs Prometheus and Grafana beside the coordinator."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import CoordinatorCollector, Refusals, RoundHistory, coordinator_registry
from node.metrics import NodeMetrics
from node.roundlog import RoundRow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _exported(tmp_path: Path) -> set[str]:
    (tmp_path / "rounds.jsonl").write_text("\n".join(
        RoundRow(r, float(r), ["a"], "x", "f", 10, 10, 0.1, 2.0, 1.5, "all_submitted").to_json() for r in range(2)) + "\n")
    refusals = Refusals()
    refusals("Submit", "late")
    refusals("Submit", "bad_payload")
    status = {"current_round": 2, "deadline_in_s": 1.0, "submitted": [], "persistence_error": "", "now": 1.0,
              "members": [SimpleNamespace(name="a", last_heartbeat=0.5, rounds_contributed=2, bytes_in=1, bytes_out=1)]}
    node = NodeMetrics("n")
    node.observe({"round": 1, "members": ["a"], "contributed": True, "loss": 2.0, "bytes_out": 5, "bytes_in": 5,
                  "train_s": 1.0, "wait_s": 1.0, "steps": 2, "dense_bytes": 50, "skipped_steps": 1})
    node.observe({"event": "state", "bytes": 10, "download_s": 1.0, "why": "join"})
    texts = [generate_latest(coordinator_registry(CoordinatorCollector(RoundHistory(tmp_path), lambda: status,
                                                                        refusals, 100, 5))).decode(),
             generate_latest(node.registry).decode()]
    return {s.name for text in texts for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_grafana_dashboard_queries_only_exported_metrics(tmp_path: Path) -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "lowband.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\blowband_[a-z_]+", e)}
    assert len(used) >= 20
    assert used - _exported(tmp_path) == set()
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_compose_runs_prometheus_and_grafana_beside_the_coordinator_and_the_scrape_config_fits() -> None:
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"coordinator", "prometheus", "grafana"} <= set(services)
    assert services["coordinator"]["command"] == ["--http-port", "8080", "--metrics-port", "9464"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    coordinator = jobs["lowband-coordinator"]
    assert coordinator["scheme"] == "https" and coordinator["authorization"]["type"] == "Bearer"
    assert coordinator["static_configs"][0]["targets"] == ["coordinator:9464"]
    nodes = {t.split(":")[0] for t in jobs["lowband-node"]["static_configs"][0]["targets"]}
    assert nodes <= set(services) and all("--metrics-port" in services[n]["command"] for n in nodes)
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "../prometheus/prometheus.yml" in mounts and "tls:/tls:ro" in mounts
    assert "lowband_read_token" in services["prometheus"]["entrypoint"][-1]
