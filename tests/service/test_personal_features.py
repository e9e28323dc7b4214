"""RecLoRA gated on the feature CRM: the gateway mixes a user's adapter from the user side of the request's
point-in-time features, as the trainer does from the offline features (same vector, same adapter)."""

from __future__ import annotations

import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from adapters.reclora import BankSettings, gate_vectors, load_reclora
from adapters.samples import build_samples
from adapters.train import score
from service.app import create_app
from service.crm import Crm, crm_dir
from service.ingest import read_movielens
from service.prompt import load_codec
from tests.utils.crm import build_crm
from tests.utils.stack import AUTH, ML100K

CRM = "gate-gbdt"


@pytest.fixture(scope="module")
def bank(tiny_settings, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("personal-features") / "data"
    shutil.copytree(tiny_settings.data_dir, data_dir, ignore=shutil.ignore_patterns("*.lock"))
    build_crm(data_dir, ML100K, CRM)
    user_dim = len(Crm(crm_dir(data_dir, CRM)).spec.user_names)
    torch.manual_seed(0)
    model = load_reclora(tiny_settings.model_dir, settings=BankSettings(n_meta=4, rank=4, alpha=8),
                         user_dim=user_dim, dtype=torch.float32).eval()
    for layer in model.layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
        torch.nn.init.normal_(layer.gate.net[3].weight, std=2.0)
    model.save(data_dir / "reclora" / "feature-bank", {"base_model": str(tiny_settings.model_dir), "crm": CRM})
    settings = tiny_settings.replace(**{"data_dir": data_dir, "reclora_bank": "feature-bank",
                                                "adapter_mode": "personal", "crm": CRM, "scorer": "llm"})
    return settings, model


def test_the_personal_adapter_is_mixed_from_the_same_user_features_online_and_offline(bank):
    settings, model = bank
    data = read_movielens(ML100K)
    sample = next(s for s in build_samples(data) if s.user_id == "13" and s.end >= 30)
    with TestClient(create_app(settings), headers=AUTH) as client:
        body = client.post("/v1/ctr", json={"user_id": "13", "item_ids": [sample.item_id], "as_of": sample.ts,
                                            "options": {"retrieval": "recent", "k": 5, "return_prompt": True}}).json()
    assert body["adapter_mode"] == "personal" and body["adapter"].startswith("p-feature-bank-"), body
    codec = load_codec(settings.model_dir)
    model.set_users(gate_vectors(settings.data_dir, CRM, [sample], data))
    offline = score(model, [body["scores"][0]["prompt_token_ids"]], codec.answer, codec.pad_id)[0]
    model.set_users(None)
    assert abs(offline - body["scores"][0]["score"]) < 0.01, (offline, body["scores"][0]["score"])
    assert body["history_size"] == sample.end


def test_without_features_the_personal_mode_falls_back_and_says_why(bank):
    settings, _ = bank
    # No CRM configured: the features stage does not run, the gate has nothing to read.
    with TestClient(create_app(settings.replace(**{"crm": None})), headers=AUTH) as client:
        body = client.post("/v1/ctr", json={"user_id": "13", "item_ids": ["1"],
                                            "options": {"retrieval": "recent"}}).json()
    assert body["adapter_mode"] != "personal"
    assert body["fallbacks"][0]["mode"] == "personal" and "no user features" in body["fallbacks"][0]["reason"]
