"""Train/serve skew guard: the trainer and the gateway build the same token ids for one sample."""

from __future__ import annotations

import asyncio

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
