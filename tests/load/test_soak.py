"""benchmarks/soak.py in its short form (a minute, the tiny model): the stack starts, locust's mixed
traffic is served without failures, and the memory and latency series are written."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from service.processes import free_port
from tests.utils.stack import REPO, serve_env


def test_a_one_minute_soak_writes_memory_and_latency_series(tiny_settings, tmp_path):
    env = serve_env(tiny_settings, tmp_path / "data", free_port())
    env.update(LOREC_ENGINE_KV_CACHE_GIB="1", LOREC_ENGINE_MAX_MODEL_LEN="4096",
               LOREC_LOAD_EVENT_USERS="soak-1,soak-2")  # the data's users keep their histories
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--minutes", "1", "--users", "2",
                           "--wait", "0.1,0.3", "--interval", "2", "--warmup-minutes", "0.2", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["routes"]) >= {"/v1/rank", "/v1/ctr", "/v1/events", "Aggregated"}
    summary = result["summary"]
    assert summary["failures"] == 0 and summary["requests"] >= 20, result["routes"]
    assert len(result["memory"]) >= 20
    for role in ("gateway", "engine", "redis"):
        assert all(not math.isnan(m[role]) and m[role] > 10 for m in result["memory"]), role
        assert summary["rss"][role]["rss_mb_end"] > 0
    assert len(result["latency"]) >= 3 and all(r["p99_ms"] >= r["p50_ms"] > 0 for r in result["latency"])
    assert summary["p99_drift"] is not None and set(summary["met"]) == {
        "rss_growth_le_10pct", "p99_no_upward_drift", "no_failures"}
