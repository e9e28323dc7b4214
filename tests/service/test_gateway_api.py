"""Gateway surface: items, events, history, adapters, health, metrics and errors (real processes)."""

from __future__ import annotations

import asyncio
import concurrent.futures

from tests.service.test_gateway import post


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
    post(gateway, "/v1/rank", {"user_id": "2", "item_ids": ["1", "2"]})
    text = gateway.get("/metrics").text
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
    assert list(stages) == ["history", "retrieval", "catalog", "prompt", "routing", "engine"]
    durations = [float(v) for v in stages.values()]
    assert all(d >= 0 for d in durations) and sum(durations) <= wall_ms
    assert float(stages["engine"]) > 0
