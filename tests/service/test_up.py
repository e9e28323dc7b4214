"""`lorec up` (README's first command after install): every part starts, answers, and stops with it."""

from __future__ import annotations

import json
import os
import signal

import httpx
import redis

from service.processes import Managed, free_port
from tests.utils.stack import LOREC, ML100K


def test_lorec_up_serves_rank_and_stops_its_children(tiny_model, adapter_dir, tmp_path):
    port, engine_port, redis_port = free_port(), free_port(), free_port()
    env = {**os.environ, "LOREC_DATA_DIR": str(tmp_path / "data"), "LOREC_MODEL": str(tiny_model),
           "LOREC_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "LOREC_PORT": str(port),
           "LOREC_DATA": str(ML100K), "LOREC_ENGINE_KV_CACHE_GIB": "1", "LOREC_ADAPTER_DIR": str(adapter_dir)}
    env.pop("QDRANT_URL", None)
    up = Managed("lorec up", [LOREC, "up", "--engine-port", str(engine_port)], tmp_path / "up.log", env=env)
    try:
        up.wait_http(f"http://127.0.0.1:{port}/readyz", 900)
        request = {"user_id": "1", "item_ids": ["1", "50", "100"], "top_k": 2}
        rank = f"http://127.0.0.1:{port}/v1/rank"
        assert httpx.post(rank, json=request, timeout=60).status_code == 401, "not open without a key"
        (key,) = json.loads((tmp_path / "data" / "api-keys.json").read_text())
        assert key in up.tail(200), "the generated key is printed once"
        response = httpx.post(rank, json=request, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["items"]) == 2
        assert (tmp_path / "data" / "redis" / "appendonlydir").is_dir(), "redis runs with AOF"
        assert (tmp_path / "data" / "qdrant-edge" / "edge_config.json").is_file()
    finally:
        os.killpg(up.process.pid, signal.SIGTERM) if up.alive() else None
        up.process.wait(60)
        up.stop()
    assert "ingest:" in up.tail(200) and "ready after" in up.tail(200)
    for url in (f"http://127.0.0.1:{engine_port}/health", f"http://127.0.0.1:{port}/healthz"):
        try:
            httpx.get(url, timeout=2)
            raise AssertionError(f"{url} still answers after lorec up stopped")
        except httpx.TransportError:
            pass
    try:
        redis.Redis(port=redis_port, socket_connect_timeout=1).ping()
        raise AssertionError("redis-server still answers after lorec up stopped")
    except redis.ConnectionError:
        pass
