"""RecLoRA serving on the real engine (tiny model): personal and cohort adapters materialised from a
bank, hot-loaded into vLLM under versioned names, LRU-bounded on disk, with the fallback chain."""

from __future__ import annotations

import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from adapters.reclora import BankSettings, cohort_centroids, load_reclora, save_cohorts
from adapters.train import score
from service.app import create_app
from service.din import DIN, Vocab, encode_rows, save_crm
from service.ingest import read_movielens
from service.prompt import load_codec
from service.records import Behaviour, Profile
from tests.utils.http import ctr
from tests.utils.stack import AUTH, ML100K

N_COHORTS = 4


@pytest.fixture(scope="module")
def bank(tiny_settings, tmp_path_factory):
    """An untrained DIN (its user vectors are still a function of the history) and a RecLoRA bank
    with random meta-LoRAs and gates, saved where the gateway looks for them."""
    data_dir = tmp_path_factory.mktemp("personal") / "data"
    shutil.copytree(tiny_settings.data_dir, data_dir, ignore=shutil.ignore_patterns("*.lock"))
    data = read_movielens(ML100K)
    torch.manual_seed(0)
    vocab = Vocab.of(data)
    crm = DIN(vocab).eval()
    save_crm(crm, vocab, data_dir / "crm" / "test-din.pt")
    model = load_reclora(tiny_settings.model_dir, settings=BankSettings(n_meta=4, rank=4, alpha=8),
                         user_dim=64, dtype=torch.float32).eval()
    for layer in model.layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
        torch.nn.init.normal_(layer.gate.net[3].weight, std=2.0)
    rows = [(u, data.profiles.get(u), [b for v, b in data.ratings if v == u][:60], "", 0)
            for u in map(str, range(1, 60))]
    users = crm.user_vector(encode_rows(rows, vocab))
    bank_dir = data_dir / "reclora" / "test-bank"
    model.save(bank_dir, {"base_model": str(tiny_settings.model_dir), "crm": "test-din.pt"})
    save_cohorts(bank_dir, {N_COHORTS: cohort_centroids(model, users, N_COHORTS), 2: cohort_centroids(model, users, 2)})
    settings = tiny_settings.replace(**{"data_dir": data_dir, "reclora_bank": "test-bank",
                                                "adapter_mode": "personal", "personal_refresh_events": 3,
                                                "personal_cache_size": 3, "cohorts": N_COHORTS})
    return {"settings": settings, "model": model, "crm": crm, "vocab": vocab}


@pytest.fixture(scope="module")
def client(bank):
    with TestClient(create_app(bank["settings"]), headers=AUTH) as c:
        yield c


def ctr_ok(client, user: str, **options) -> dict:
    response = ctr(client, user, ["1", "2", "3"], return_prompt=True, **options)
    assert response.status_code == 200, response.text
    return response.json()


def user_vector(client, bank, user: str) -> torch.Tensor:
    history = client.get(f"/v1/users/{user}/history?limit=10000").json()
    behaviours = [Behaviour(e["item_id"], e["ts"], e["rating"]) for e in history["events"]]
    row = (user, Profile(**history["profile"]), behaviours, "", 0)
    return bank["crm"].user_vector(encode_rows([row], bank["vocab"]))[0]


def test_personal_adapter_served_by_vllm_equals_reclora_in_transformers(client, bank):
    body = ctr_ok(client, "5")
    assert body["adapter_mode"] == "personal" and body["adapter"].startswith("p-test-bank-")
    assert "fallbacks" not in body
    model, codec = bank["model"], load_codec(bank["settings"].model_dir)
    prompts = [s["prompt_token_ids"] for s in body["scores"]]
    model.set_users(user_vector(client, bank, "5").unsqueeze(0).expand(len(prompts), -1))
    offline = score(model, prompts, codec.answer, codec.pad_id)
    served = [s["score"] for s in body["scores"]]
    assert sum(abs(a - b) for a, b in zip(offline, served)) / len(served) < 0.01, (offline, served)
    model.set_users(None)
    base = ctr_ok(client, "5", mode="base")
    assert base["adapter"] == "base" and max(abs(a["score"] - b) for a, b in zip(base["scores"], served)) > 1e-3


def test_grown_history_gets_a_new_adapter_version_and_the_cache_stays_bounded(client, bank):
    first = ctr_ok(client, "7")["adapter"]
    events = [{"user_id": "7", "item_id": str(i), "ts": 2_000_000_000 + i, "rating": 5} for i in range(10, 13)]
    assert client.post("/v1/events", json={"events": events}).status_code == 200
    second = ctr_ok(client, "7")["adapter"]
    assert second != first and second.rsplit("-v", 1)[0] == first.rsplit("-v", 1)[0]
    for user in ("8", "9", "10"):
        ctr_ok(client, user)
    cache = bank["settings"].data_dir / "personal"
    assert len(list(cache.glob("p-*"))) == 3  # LRU bound
    assert not (cache / first).exists()


def test_cohort_mode_serves_the_nearest_cohort(client, bank):
    body = ctr_ok(client, "12", mode="cohort")
    personalizer = client.app.state.recommender.router.personalizer
    alphas = personalizer.bank.alphas(user_vector(client, bank, "12"))
    assert body["adapter_mode"] == "cohort"
    assert body["adapter"] == personalizer.cohort_name(personalizer.bank.nearest_cohort(alphas))
    assert body["adapter"].startswith("c-test-bank-") and body["adapter"].split("-")[-2] == str(N_COHORTS)


def test_broken_personal_adapter_falls_back_to_cohort_and_is_quarantined(client, bank):
    router = client.app.state.recommender.router
    history_size = len(client.get("/v1/users/13/history?limit=10000").json()["events"])
    name = router.personalizer.personal_name("13", history_size)
    broken = bank["settings"].data_dir / "personal" / name
    shutil.copytree(bank["settings"].data_dir / "personal" / router.personalizer.cohort_name(0), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    for _ in range(2):
        body = ctr_ok(client, "13")
        assert body["adapter_mode"] == "cohort" and body["adapter"].startswith("c-test-bank-")
        assert body["fallbacks"][0]["mode"] == "personal"
    assert name in router.quarantined


def test_shared_mode_without_a_shared_adapter_serves_base_and_says_so(client):
    body = ctr_ok(client, "5", mode="shared")
    assert body["adapter"] == "base" and body["adapter_mode"] == "base"
    assert body["fallbacks"] == [{"mode": "shared", "reason": "no shared adapter configured"}]
    assert ctr_ok(client, "5", adapter="base")["adapter_mode"] == "base"
