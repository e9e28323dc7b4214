"""README's first command on a fresh machine: `lorec up` serves the hybrid that ships for ML-100K."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest
from sklearn.metrics import roc_auc_score

from adapters.samples import build_samples, draw, split_by_time
from service.ingest import read_movielens
from service.processes import Managed, free_port
from service.shipped import shipped_for
from tests.utils.stack import LOREC, ML100K

SLICE = 300  # seeded ML-100K test samples, each scored at its own as_of


async def _scores(base: str, key: str, samples) -> list[float]:
    limit = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {key}"}, timeout=600) as client:
        async def one(s) -> float:
            async with limit:
                response = await client.post("/v1/ctr", json={"user_id": s.user_id, "item_ids": [s.item_id],
                                                              "as_of": s.ts})
            body = response.json()
            assert response.status_code == 200 and body["scorer"] == "hybrid", body
            return body["scores"][0]["score"]
        return await asyncio.gather(*(one(s) for s in samples))


@pytest.mark.gemma
def test_lorec_up_on_a_fresh_data_folder_serves_the_shipped_hybrid(gemma_model, gemma_engine, tmp_path):
    data = read_movielens(ML100K)
    found = shipped_for(data.fingerprint)
    assert found is not None, "adapters/shipped holds no models trained on these ML-100K files"
    _, manifest = found
    port, redis_port = free_port(), free_port()
    env = {**os.environ, "LOREC_DATA_DIR": str(tmp_path / "data"), "LOREC_MODEL": str(gemma_model),
           "LOREC_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "LOREC_PORT": str(port),
           "LOREC_DATA": str(ML100K), "LOREC_ENGINE_URL": gemma_engine}
    for name in ("QDRANT_URL", "LOREC_CRM", "LOREC_COMBINER", "LOREC_DEFAULT_ADAPTER", "LOREC_API_KEYS"):
        env.pop(name, None)
    up = Managed("lorec up", [LOREC, "up"], tmp_path / "up.log", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        up.wait_http(f"{base}/readyz", 900)
        (key,) = json.loads((tmp_path / "data" / "api-keys.json").read_text())
        # README's curl example
        ranked = httpx.post(f"{base}/v1/rank", headers={"authorization": f"Bearer {key}"}, timeout=600,
                            json={"user_id": "1", "item_ids": ["1", "50", "100", "181", "258"], "top_k": 3,
                                  "options": {"explain": True}}).json()
        assert ranked["scorer"] == "hybrid" and ranked["combiner"] == manifest.combiner, ranked
        assert ranked["adapter"] == manifest.adapter and len(ranked["items"]) == 3
        assert all(set(i["components"]) == {"llm", "crm"} for i in ranked["items"])
        samples = draw(split_by_time(build_samples(data))["test"], SLICE, 0)
        scores = asyncio.run(_scores(base, key, samples))
        auc = roc_auc_score([s.label for s in samples], scores)
        print(f"\nshipped hybrid through `lorec up`: AUC {auc:.3f} on {SLICE} seeded ML-100K test samples")
        assert auc >= 0.70
    finally:
        if up.alive():
            os.killpg(up.process.pid, signal.SIGTERM)
            up.process.wait(60)
        up.stop()
