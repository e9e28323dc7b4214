"""One error shape (service/errors.py): 422 naming the field, 409 before ingestion, 503 naming the dependency
with nothing written."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.processes import free_port
from tests.utils.metrics import metric_total
from tests.utils.stack import AUTH


def test_engine_down_answers_503_naming_vllm(tiny_settings, tmp_path):
    settings = tiny_settings.replace(**{"engine_url": f"http://127.0.0.1:{free_port()}",
                                                "data_dir": tmp_path / "data"})
    with TestClient(create_app(settings), headers=AUTH) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["dependencies"]["vllm"].startswith("engine unreachable")
        assert ready.json()["dependencies"]["redis"] == "ok"
        assert ready.json()["warmup"].startswith("pending: "), "not ready before the engine scored the warm-up"
        response = client.post("/v1/ctr", json={"user_id": "1", "item_ids": ["1"], "options": {"retrieval": "recent"}})
        assert response.status_code == 503
        assert response.json()["error"]["dependency"] == "vllm"
        metrics = client.get("/metrics").text
        assert metric_total(metrics, "lorec_engine_calls_total", adapter="base", outcome="error") == 1.0
        assert metric_total(metrics, "lorec_dependency_errors_total", dependency="vllm") == 1.0
        assert metric_total(metrics, "lorec_warm") == 0


def test_redis_down_answers_503_naming_redis_and_writes_nothing(tiny_settings, tmp_path):
    settings = tiny_settings.replace(**{"redis_url": f"redis://127.0.0.1:{free_port()}/0",
                                                "data_dir": tmp_path / "data"})
    with TestClient(create_app(settings), headers=AUTH) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").json()["dependencies"]["redis"] != "ok"
        for method, path, body in (("post", "/v1/ctr", {"user_id": "1", "item_ids": ["1"]}),
                                   ("post", "/v1/events", {"events": [{"user_id": "1", "item_id": "1", "ts": 1,
                                                                       "rating": 4}]}),
                                   ("get", "/v1/users/1/history", None)):
            response = client.request(method, path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["error"]["dependency"] == "redis"


def test_over_long_ids_and_too_many_candidates_are_422(gateway, tiny_settings):
    long_id = "x" * 129
    for body, field in (({"user_id": long_id, "item_ids": ["1"]}, "user_id"),
                        ({"user_id": "1", "item_ids": [long_id]}, "item_ids.0")):
        response = gateway.post("/v1/ctr", json=body)
        assert response.status_code == 422 and response.json()["error"]["field"] == field
    too_many = [str(i) for i in range(1, tiny_settings.requests.max_candidates + 2)]
    response = gateway.post("/v1/ctr", json={"user_id": "1", "item_ids": too_many})
    assert response.status_code == 422 and response.json()["error"]["field"] == "item_ids"
    event = {"event_id": "e" * 129, "user_id": "1", "item_id": "1", "ts": 1, "rating": 3}
    response = gateway.post("/v1/events", json={"events": [event]})
    assert response.status_code == 422 and response.json()["error"]["field"] == "events.0.event_id"


def test_items_before_any_ingestion_answer_409(tiny_settings, tmp_path):
    fresh = tiny_settings.replace(**{"data_dir": tmp_path / "data"})
    with TestClient(create_app(fresh), headers=AUTH) as client:
        response = client.put("/v1/items/first", json={"title": "First Film"})
    assert response.status_code == 409 and response.json()["error"]["type"] == "catalog_not_ingested"
