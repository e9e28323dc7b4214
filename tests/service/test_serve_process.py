"""`lorec serve` as a user runs it: a separate gateway process configured only by environment."""

from __future__ import annotations

import httpx

from service.processes import Managed, free_port
from tests.utils.stack import AUTH, LOREC, serve_env


def test_lorec_serve_process_answers_rank(http_gateway, gateway):
    base, _, _ = http_gateway
    request = {"user_id": 1, "item_ids": [1, 2, 3], "top_k": 2}
    response = httpx.post(f"{base}/v1/rank", json=request, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["items"]) == 2 and body["items"][0]["score"] >= body["items"][1]["score"]
    expected = gateway.post("/v1/rank", json=request).json()
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in expected["items"]]


def test_lorec_serve_stops_gracefully(tiny_settings, tmp_path):
    port = free_port()
    env = serve_env(tiny_settings, tmp_path / "data", port)
    server = Managed("gateway", [LOREC, "serve"], tmp_path / "gw.log", env=env)
    server.wait_http(f"http://127.0.0.1:{port}/healthz", 120)
    server.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit -15).
    assert server.process.returncode in (0, -15), server.tail()
    assert "Application shutdown complete" in server.tail(50)
