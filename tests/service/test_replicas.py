"""Several vLLM replicas behind one gateway: adapter affinity by rendezvous hashing, failover on a dead one.

Two real vLLM servers (the session's tiny engine and one this module starts and then kills).
"""

from __future__ import annotations

import os
import shutil
import signal

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.prompt import AnswerTokens
from service.scoring import EngineClient, EnginePool
from tests.utils.stack import AUTH, make_settings, start_engine


def spread_over(urls: list[str], per_replica: int = 3) -> list[str]:
    """Adapter names whose rendezvous homes split evenly over `urls` (the ports, hence the homes, vary per run)."""
    pool, names = pool_of(urls), []
    for url in urls:
        names += [n for n in (f"tiny-replica-{i}" for i in range(200)) if pool.home(n) == url][:per_replica]
    return names


def pool_of(urls: list[str]) -> EnginePool:
    return EnginePool([EngineClient(httpx.AsyncClient(base_url=u), "base", AnswerTokens(1, 2)) for u in urls])


def test_rendezvous_order_moves_only_the_keys_of_a_removed_replica():
    urls = [f"http://engine-{i}:8100" for i in range(4)]
    full, less = pool_of(urls), pool_of(urls[:3])
    keys = [f"adapter-{i}" for i in range(400)]
    homes = {k: full.home(k) for k in keys}
    assert set(homes.values()) == set(urls), "every replica is home to some keys"
    assert all(homes[k] == full.home(k) for k in keys), "stable"
    for k in keys:
        if homes[k] != urls[3]:
            assert less.home(k) == homes[k], "keys of the remaining replicas stay where they were"
        else:
            assert less.home(k) == full.order(k)[1].url, "a removed replica's keys go to their next replica"


@pytest.fixture(scope="module")
def second_engine(workdir, tiny_model, redis_url):
    engine, url = start_engine(make_settings(workdir, tiny_model, redis_url), tiny_model,
                               workdir / "logs" / "vllm-replica.log")
    yield engine, url
    engine.stop()


def loaded_on(url: str) -> set[str]:
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def test_each_adapter_stays_on_its_replica_and_moves_when_that_replica_dies(tiny_settings, tiny_engine,
                                                                              second_engine, tmp_path):
    engine, spare_url = second_engine
    adapters = spread_over([tiny_engine, spare_url])
    for name in adapters:
        shutil.copytree(tiny_settings.registry_dir / "tiny-random-v1", tiny_settings.registry_dir / name,
                        dirs_exist_ok=True)
    settings = tiny_settings.replace(**{"engine_url": f"{tiny_engine},{spare_url}",
                                                "data_dir": tmp_path / "data", "qdrant_url": ":memory:"})
    with TestClient(create_app(settings), headers=AUTH) as client:
        pool = client.app.state.recommender.engine
        homes = {name: pool.home(name) for name in adapters}
        assert set(homes.values()) == {tiny_engine, spare_url}, "the six adapters spread over both replicas"

        def rank(name: str) -> httpx.Response:
            return client.post("/v1/rank", json={"user_id": "1", "item_ids": ["1", "2"],
                                                 "options": {"adapter": name, "retrieval": "recent"}})

        first = {name: rank(name).json()["items"] for name in adapters}
        for _ in range(2):
            for name in adapters:
                assert rank(name).status_code == 200
        for url in (tiny_engine, spare_url):
            mine = {n for n, home in homes.items() if home == url}
            assert mine <= loaded_on(url) and not (set(adapters) - mine) & loaded_on(url), \
                f"{url} holds exactly its own adapters"

        os.killpg(engine.process.pid, signal.SIGKILL)
        engine.process.wait(30)
        for name in adapters:
            response = rank(name)
            assert response.status_code == 200, response.text
            assert "degraded" not in response.json()
            after = {i["item_id"]: i["score"] for i in response.json()["items"]}
            assert after == pytest.approx({i["item_id"]: i["score"] for i in first[name]}, abs=1e-3), \
                "the same adapter on the other replica gives the same scores"
        assert set(adapters) <= loaded_on(tiny_engine), "the dead replica's adapters moved to the live one"
        base = client.post("/v1/ctr", json={"user_id": "2", "item_ids": ["3"], "options": {"retrieval": "recent"}})
        assert base.status_code == 200 and client.get("/readyz").json()["dependencies"]["vllm"] == "ok"
