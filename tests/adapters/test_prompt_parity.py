"""Train/serve skew guard: the trainer and the gateway build the same token ids for one sample."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from adapters.samples import build_samples, prompt_ids, user_timelines
from service.ingest import read_movielens
from service.prompt import load_codec
from tests.utils.stack import ML100K


@pytest.mark.parametrize("mode", ["subr", "recent"])
def test_trainer_and_gateway_prompts_are_identical_tokens(gateway, tiny_settings, mode):
    data = read_movielens(ML100K)
    catalog = {i.item_id: i for i in data.items}
    timeline = user_timelines(data)["13"]
    sample = next(s for s in build_samples(data) if s.user_id == "13" and s.end >= 40)
    assert all(b.ts < sample.ts for b in sample.history()) and sample.end < len(timeline)

    codec = load_codec(tiny_settings.model_dir)
    index = gateway.app.state.recommender.index  # same vectors as the gateway; trainers open the same store
    offline = asyncio.run(prompt_ids(sample, data.profiles["13"], catalog, index, codec, 10, mode))

    body = gateway.post("/v1/ctr", json={"user_id": "13", "item_ids": [sample.item_id], "as_of": sample.ts,
                                          "options": {"retrieval": mode, "return_prompt": True}}).json()
    assert body["history_size"] == len(sample.history())
    assert body["scores"][0]["prompt_token_ids"] == offline


def test_the_crms_estimate_reads_the_same_in_trainer_and_gateway_prompts(gateway, crm_fallback_settings,
                                                                        adapter_dir, tmp_path):
    """An adapter trained with the CRM's estimate in its prompt (`lorec train reit --prompt crm-estimate`) is
    served the same tokens, and one trained on another CRM's estimate is refused by name."""
    from fastapi.testclient import TestClient

    from adapters.features import OfflineFeatures
    from service.app import create_app
    from service.artifacts import AdapterManifest
    from service.crm import Crm, crm_dir
    from tests.utils.http import wait_ready
    from tests.utils.stack import AUTH

    crm = Crm(crm_dir(crm_fallback_settings.data_dir, crm_fallback_settings.scoring.crm))
    registry = tmp_path / "adapters"
    for name, shown in (("tiny-crmp-v1", crm.ref), ("tiny-crmp-other-v1", "other-gbdt@0123")):
        shutil.copytree(adapter_dir / "tiny-random-v1", registry / name)
        AdapterManifest.new(name=name, base_model="tiny", prompt_crm=shown).save(registry / name)

    data = read_movielens(ML100K)
    catalog = {i.item_id: i for i in data.items}
    sample = next(s for s in build_samples(data) if s.user_id == "13" and s.end >= 40)
    logit = float(crm.logits(OfflineFeatures(data, crm.spec).matrix([sample]))[0])
    codec = load_codec(crm_fallback_settings.model_dir)
    offline = asyncio.run(prompt_ids(sample, data.profiles["13"], catalog, gateway.app.state.recommender.index,
                                     codec, 10, "recent", crm_logit=logit))
    assert "% chance that the user likes it." in codec.tokenizer.decode(offline)

    settings = crm_fallback_settings.replace(**{"adapter_dir": registry})
    with TestClient(create_app(settings), headers=AUTH) as client:
        wait_ready(client)
        request = {"user_id": "13", "item_ids": [sample.item_id], "as_of": sample.ts,
                   "options": {"adapter": "tiny-crmp-v1", "retrieval": "recent", "return_prompt": True}}
        body = client.post("/v1/ctr", json=request).json()
        assert body["adapter"] == "tiny-crmp-v1" and body["scores"][0]["prompt_token_ids"] == offline
        request["options"]["adapter"] = "tiny-crmp-other-v1"
        refused = client.post("/v1/ctr", json=request)
        assert refused.status_code == 409 and refused.json()["error"]["field"] == "options.adapter"
        assert "other-gbdt@0123" in refused.json()["error"]["message"]
