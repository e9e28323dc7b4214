"""README's first command on a fresh machine: `lorec up` serves the hybrid that ships for ML-100K."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx
import pytest

from service.ingest import read_movielens
from service.processes import Managed, free_port
from service.shipped import shipped_for
from tests.utils.stack import LOREC, ML100K

SLICE = 300  # seeded ML-100K test samples, each scored at its own as_of


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
        # `lorec eval` as the figures are made: each sample at its own as_of, the CRM's served scores checked
        # against the shipped CRM run on the raw files (a store unlike its data is refused)
        done = subprocess.run([LOREC, "eval", "--dir", str(ML100K), "--gateway", base, "--mode", "shared",
                               "--scorer", "hybrid", "--n", str(SLICE), "--no-offline"],
                              env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"\nshipped hybrid through `lorec up`: AUC {result['auc']:.3f} on {SLICE} seeded ML-100K test samples")
        assert result["scorers"] == {"hybrid": SLICE} and result["auc"] >= 0.70
        check = result["crm_offline"]
        assert check["agree"] and check["n"] == SLICE and check["max_abs_delta_p"] <= 1e-9, check
    finally:
        if up.alive():
            os.killpg(up.process.pid, signal.SIGTERM)
            up.process.wait(60)
        up.stop()
