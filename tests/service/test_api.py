"""The HTTP API (service/api.py, app.py) end to end on real processes: redis-server, embedded Qdrant Edge and
a vLLM server (tiny Llama): scores, ranks, as_of, retrieval, items, events, history, adapters, health,
metrics and errors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import math

import pytest

from service.retrieval import brute_force_nearest
from tests.utils.http import post
from tests.utils.metrics import metric_total
from tests.utils.stack import AFTER_DATA, AUTH

USER = "1"
ITEMS = ["1", "50", "100", "181", "258", "300", "7", "12"]


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
    event = {"user_id": user, "item_id": "1682", "rating": 5, "ts": max(newest, AFTER_DATA) + 60}
    post(gateway, "/v1/events", {"events": [event]})
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


def test_put_item_writes_catalog_and_vector_and_is_scorable(gateway):
    item = {"title": "The Brand New Film", "year": 2024, "genres": ["Drama", "Sci-Fi"]}
    response = gateway.put("/v1/items/new-film-1", json=item)
    assert response.status_code == 200, response.text
    index = gateway.app.state.recommender.index
    vectors = asyncio.run(index.vectors(["new-film-1", "1"]))
    assert set(vectors) == {"new-film-1", "1"}
    assert vectors["new-film-1"].shape == vectors["1"].shape
    body = post(gateway, "/v1/ctr", {"user_id": "3", "item_ids": ["new-film-1"], "options": {"return_prompt": True}})
    assert 0 < body["scores"][0]["score"] < 1


def test_default_adapter_is_loaded_once_and_changes_scores(gateway, tiny_settings):
    import shutil

    # A name no other test has loaded into the session's engine.
    name = "tiny-random-singleflight-v1"
    shutil.copytree(tiny_settings.registry_dir / "tiny-random-v1", tiny_settings.registry_dir / name)
    metrics = gateway.app.state.metrics
    loads_before = metrics.adapter_loads.labels("loaded")._value.get()
    request = {"user_id": "5", "item_ids": ["1", "2", "3"]}
    base = post(gateway, "/v1/ctr", request)
    with_adapter = {**request, "options": {"adapter": name}}

    # Concurrent first requests for one new adapter trigger a single load (single-flight).
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda _: post(gateway, "/v1/ctr", with_adapter), range(4)))
    assert metrics.adapter_loads.labels("loaded")._value.get() - loads_before == 1
    assert all(b["adapter"] == name for b in bodies)
    tuned = [s["score"] for s in bodies[0]["scores"]]
    assert max(abs(a - b) for a, b in zip(tuned, [s["score"] for s in base["scores"]])) > 1e-4
    for other in bodies[1:]:
        assert max(abs(a - s["score"]) for a, s in zip(tuned, other["scores"])) < 1e-6


def test_unknown_adapter_and_path_escape_are_404(gateway):
    for name in ("nope", "../adapters", "/etc"):
        response = gateway.post("/v1/ctr", json={"user_id": "1", "item_ids": ["1"], "options": {"adapter": name}})
        assert response.status_code == 404
        assert response.json()["error"]["field"] == "options.adapter"


def test_unknown_items_answer_404_listing_them(gateway):
    response = gateway.post("/v1/rank", json={"user_id": "1", "item_ids": ["1", "no-such", "also-not"]})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "unknown_items"
    assert [d["item_id"] for d in error["details"]] == ["no-such", "also-not"]


def test_cold_start_user_gets_scores(gateway):
    body = post(gateway, "/v1/ctr", {"user_id": "brand-new-user", "item_ids": ["1", "2"]})
    assert body["history_size"] == 0
    assert all(0 < s["score"] < 1 for s in body["scores"])


def test_validation_errors_name_the_field(gateway):
    cases = [
        ({"user_id": "1", "item_ids": []}, "item_ids"),
        ({"user_id": "", "item_ids": ["1"]}, "user_id"),
        ({"user_id": "1", "item_ids": ["1", "1"]}, "body"),
        ({"user_id": "1", "item_ids": ["1"], "options": {"k": 500}}, "options.k"),
        ({"user_id": "1", "item_ids": ["1"], "as_of": -5}, "as_of"),
        ({"user_id": True, "item_ids": ["1"]}, "user_id"),
        ({"user_id": "1", "item_ids": ["1"], "surprise": 1}, "surprise"),
    ]
    for body, field in cases:
        response = gateway.post("/v1/ctr", json=body)
        assert response.status_code == 422, body
        assert response.json()["error"]["field"] == field, (body, response.json())
    bad_event = gateway.post("/v1/events", json={"events": [{"user_id": "1", "item_id": "2", "ts": 5}]})
    assert bad_event.status_code == 422
    assert gateway.post("/v1/rank", content=b"{not json", headers={"content-type": "application/json"}
                        ).status_code == 422


def test_history_of_unknown_user_is_404(gateway):
    response = gateway.get("/v1/users/nobody-here/history")
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "user_id"


def test_health_ready_and_metrics(gateway):
    assert gateway.get("/healthz").json() == {"status": "ok"}
    ready = gateway.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["dependencies"] == {"redis": "ok", "qdrant": "ok", "vllm": "ok"}
    assert ready.json()["warmup"] == "ok"
    post(gateway, "/v1/rank", {"user_id": "2", "item_ids": ["1", "2"]})
    text = gateway.get("/metrics").text
    assert metric_total(text, "lorec_warm") == 1 and metric_total(text, "lorec_adapters_quarantined") == 0
    assert metric_total(text, "lorec_answers_total", scorer="llm") >= 2
    for stage in ("history", "retrieval", "prompt", "routing", "engine"):
        assert f'lorec_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'lorec_request_seconds_count{method="POST",route="/v1/rank",status="200"}' in text
    assert "lorec_engine_calls_total" in text and "lorec_adapter_loads_total" in text


def test_server_timing_header_lists_every_stage(gateway):
    import time

    started = time.perf_counter()
    response = gateway.post("/v1/rank", json={"user_id": "4", "item_ids": ["1", "2"]})
    wall_ms = (time.perf_counter() - started) * 1000
    stages = dict(part.split(";dur=") for part in response.headers["server-timing"].split(", "))
    assert list(stages) == ["history", "retrieval", "catalog", "routing", "prompt", "engine"]
    durations = [float(v) for v in stages.values()]
    assert all(d >= 0 for d in durations) and sum(durations) <= wall_ms
    assert float(stages["engine"]) > 0


def test_unknown_items_can_be_skipped_and_listed(gateway):
    body = post(gateway, "/v1/rank", {"user_id": "1", "item_ids": ["nope-1", "1", "nope-2", "2"],
                                      "options": {"skip_unknown": True}})
    assert [i["item_id"] for i in body["items"]] != [] and {i["item_id"] for i in body["items"]} == {"1", "2"}
    assert body["skipped"] == ["nope-1", "nope-2"]
    nothing = post(gateway, "/v1/ctr", {"user_id": "1", "item_ids": ["nope-3"], "options": {"skip_unknown": True}})
    assert nothing["scores"] == [] and nothing["skipped"] == ["nope-3"] and nothing["adapter_mode"] == "none"


def test_the_gateway_freezes_the_objects_of_its_start(tiny_settings, tmp_path):
    """A full collection would otherwise scan every object of the start (torch, vLLM's modules, the CRM) and
    pause the requests (~0.6 s a collection in ML-1M's gateway here: benchmarks/gateway_gc.py)."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    gc.unfreeze()
    with TestClient(create_app(tiny_settings.replace(data_dir=tmp_path / "data")), headers=AUTH):
        assert gc.get_freeze_count() > 10_000  # the modules alone hold more
        assert len(gc.get_objects()) < gc.get_freeze_count(), "a collection scans the few made since"
