"""deploy/monitoring/: the Grafana dashboard and the Prometheus alert rules parse, the rules fire when they
should (promtool), and every metric they name is exported by a live gateway or its vLLM engine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.utils.http import wait_ready

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
DASHBOARD = MONITORING / "lorec-dashboard.json"
RULES = MONITORING / "alerts.yml"
# A metric name in PromQL: lorec's and vLLM's (other identifiers are functions, labels or Prometheus' own).
METRIC = re.compile(r"\b(lorec_[a-z_]+|vllm:[a-z_]+)")


def promtool(*args: str, cwd: Path = MONITORING) -> str:
    assert shutil.which("promtool"), "scripts/install.sh installs promtool (Debian's prometheus package)"
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_dashboard_is_grafana_json_on_a_prometheus_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "lorec-overview" and len(dashboard["panels"]) >= 15
    assert [v["type"] for v in dashboard["templating"]["list"]] == ["datasource"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    covered = " ".join(dashboard_exprs())
    for metric in ("lorec_request_seconds", "lorec_stage_seconds", "lorec_engine_calls_total", "lorec_degraded_total",
                   "lorec_adapter_loads_total", "lorec_adapters_quarantined", "lorec_fallbacks_total",
                   "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"):
        assert metric in covered, f"the dashboard shows no {metric}"


def test_rules_pass_promtool_and_fire_on_their_unit_tests():
    assert "SUCCESS: 7 rules found" in promtool("check", "rules", RULES.name)
    promtool("test", "rules", "alerts.test.yml")


def test_compose_prometheus_config_loads_the_rules(tmp_path):
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert {j["job_name"] for j in config["scrape_configs"]} == {"lorec-gateway", "lorec-engine"}
    assert any("lorec-engine" in e for e in rule_exprs()), "the engine-down rule names the scrape job"
    shutil.copy(RULES, tmp_path / "alerts.yml")
    config["rule_files"] = [str(tmp_path / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool("check", "config", "prometheus.yml", cwd=tmp_path)


def exported_names(text: str) -> set[str]:
    """The sample names a /metrics page can carry, including families with no samples yet."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {family.name + suffix for suffix in ("_total", "_bucket", "_count", "_sum", "_created")}
        names |= {s.name for s in family.samples}
    return names


def test_every_metric_named_is_exported(gateway, tiny_engine):
    wait_ready(gateway)
    exported = exported_names(gateway.get("/metrics").text) | exported_names(
        httpx.get(f"{tiny_engine}/metrics", timeout=10).text)
    named = {m for expr in dashboard_exprs() + rule_exprs() for m in METRIC.findall(expr)}
    assert len(named) >= 15
    assert not named - exported, f"named by the dashboard or the rules but not exported: {sorted(named - exported)}"

