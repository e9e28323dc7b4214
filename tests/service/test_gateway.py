"""The gateway end to end: real redis-server, embedded Qdrant Edge, real vLLM server (tiny Llama)."""

from __future__ import annotations

import asyncio
import math

import pytest

from service.retrieval import brute_force_nearest

USER = "1"
ITEMS = ["1", "50", "100", "181", "258", "300", "7", "12"]


def post(gateway, path, body, status=200):
    response = gateway.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


def test_ctr_scores_are_two_way_softmax_of_answer_logprobs(gateway):
    body = post(gateway, "/v1/ctr", {"user_id": USER, "item_ids": ITEMS})
    assert [s["item_id"] for s in body["scores"]] == ITEMS
    for s in body["scores"]:
        yes, no = math.exp(s["logprob_yes"]), math.exp(s["logprob_no"])
        assert 0.0 < s["score"] < 1.0
        assert s["score"] == pytest.approx(yes / (yes + no), rel=1e-9)
        assert s["logprob_yes"] <= 0 and s["logprob_no"] <= 0
    assert len({round(s["score"], 6) for s in body["scores"]}) > 1, "all candidates scored alike"


def test_rank_order_equals_sorted_ctr_scores(gateway):
    ctr = post(gateway, "/v1/ctr", {"user_id": USER, "item_ids": ITEMS})
    ranked = post(gateway, "/v1/rank", {"user_id": USER, "item_ids": ITEMS, "top_k": 5})
    expected = sorted(ctr["scores"], key=lambda s: -s["score"])[:5]
    assert [s["item_id"] for s in ranked["items"]] == [s["item_id"] for s in expected]
    assert [s["score"] for s in ranked["items"]] == pytest.approx([s["score"] for s in expected], abs=1e-6)


def test_same_request_twice_gives_same_scores(gateway):
    request = {"user_id": "7", "item_ids": ITEMS[:4]}
    first = post(gateway, "/v1/ctr", request)
    second = post(gateway, "/v1/ctr", request)
    assert [s["score"] for s in first["scores"]] == pytest.approx([s["score"] for s in second["scores"]],
                                                                  abs=1e-6)


def test_integer_ids_are_accepted_as_decimal_strings(gateway):
    as_ints = post(gateway, "/v1/ctr", {"user_id": 1, "item_ids": [50, 100]})
    as_strs = post(gateway, "/v1/ctr", {"user_id": "1", "item_ids": ["50", "100"]})
    assert as_ints["user_id"] == "1"
    assert [s["item_id"] for s in as_ints["scores"]] == ["50", "100"]
    assert [s["score"] for s in as_ints["scores"]] == pytest.approx([s["score"] for s in as_strs["scores"]],
                                                                    abs=1e-6)


def test_appended_event_changes_the_next_prompt(gateway):
    user = "900"
    request = {"user_id": user, "item_ids": ["1"], "options": {"retrieval": "recent", "explain": True,
                                                                "return_prompt": True}}
    before = post(gateway, "/v1/ctr", request)
    history = gateway.get(f"/v1/users/{user}/history", params={"limit": 1}).json()
    newest = history["events"][-1]["ts"]
    post(gateway, "/v1/events", {"events": [{"user_id": user, "item_id": "1682", "rating": 5, "ts": newest + 60}]})
    after = post(gateway, "/v1/ctr", request)
    assert after["history_size"] == before["history_size"] + 1
    assert after["scores"][0]["why"][-1]["item_id"] == "1682"
    assert after["scores"][0]["prompt_token_ids"] != before["scores"][0]["prompt_token_ids"]
    assert gateway.get(f"/v1/users/{user}/history", params={"limit": 1}).json()["events"][-1]["item_id"] == "1682"


def test_as_of_hides_later_behaviours(gateway):
    history = gateway.get(f"/v1/users/{USER}/history", params={"limit": 10_000}).json()["events"]
    cut = history[100]["ts"]
    body = post(gateway, "/v1/ctr", {"user_id": USER, "item_ids": ["1"], "as_of": cut,
                                     "options": {"retrieval": "recent", "explain": True}})
    assert body["history_size"] == sum(1 for e in history if e["ts"] < cut)
    assert all(b["ts"] < cut for b in body["scores"][0]["why"])


def test_subr_picks_the_nearest_history_items(gateway):
    body = post(gateway, "/v1/ctr", {"user_id": USER, "item_ids": ITEMS[:3], "options": {"explain": True, "k": 10}})
    history = gateway.get(f"/v1/users/{USER}/history", params={"limit": 10_000}).json()["events"]
    index = gateway.app.state.recommender.index  # the gateway's own Qdrant Edge shard
    vecs = asyncio.run(index.vectors(list({e["item_id"] for e in history} | set(ITEMS))))
    history_vectors = {e["item_id"]: vecs[e["item_id"]] for e in history}
    for s in body["scores"]:
        expected = brute_force_nearest(vecs[s["item_id"]], history_vectors, 10)
        assert sorted(b["item_id"] for b in s["why"]) == sorted(expected)
        assert [b["ts"] for b in s["why"]] == sorted(b["ts"] for b in s["why"]), "not in time order"
