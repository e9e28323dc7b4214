"""The gateway on a real three-node Redis Cluster (LOREC_REDIS_CLUSTER): same answers as on one server,
each user's keys in one slot, transactional per-user writes, and a dead node answered with a 503."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time

import pytest
import redis

from service.history import Keys
from service.ingest import ingest_folder
from service.processes import Managed, redis_command
from tests.utils.stack import AUTH, ML100K, make_settings

AS_OF = 890_000_000  # before any event other tests append
REQUEST = {"user_id": "42", "item_ids": ["1", "50", "100", "181", "258"], "as_of": AS_OF}


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too; Redis wants port <= 55535."""
    while True:
        port = random.randint(20_000, 45_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three masters on free ports, slots spread by `redis-cli --cluster create`. Yields (url, nodes)."""
    root = tmp_path_factory.mktemp("redis-cluster")
    ports = [cluster_port() for _ in range(3)]
    nodes = [Managed(f"redis-{p}", redis_command(root / str(p), p) + ["--cluster-enabled", "yes",
                     "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"],
                     root / f"redis-{p}.log") for p in ports]
    try:
        for node, port in zip(nodes, ports):
            node.wait_redis(f"redis://127.0.0.1:{port}/0", 30)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        for _ in range(100):  # every node must agree the slots are covered before the tests start
            if all(redis.Redis(port=p).cluster("info").get("cluster_state") == "ok" for p in ports):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the Redis Cluster did not reach cluster_state:ok in 10 s")
        yield f"redis://127.0.0.1:{ports[0]}/0", dict(zip(ports, nodes))
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def cluster_gateway(cluster, tmp_path_factory, workdir, tiny_model, tiny_engine, ingested):
    from fastapi.testclient import TestClient

    from service.app import create_app

    url, _ = cluster
    settings = make_settings(workdir, tiny_model, url, redis_cluster=True, engine_url=tiny_engine,
                             data_dir=tmp_path_factory.mktemp("cluster-data"))
    report = asyncio.run(ingest_folder(settings, ML100K))
    with TestClient(create_app(settings), headers=AUTH) as client:
        yield client, report


def test_ingestion_and_scores_match_a_single_server(cluster_gateway, gateway, ingested):
    client, report = cluster_gateway
    assert {k: report[k] for k in ("users", "items", "ratings")} == \
        {k: ingested[k] for k in ("users", "items", "ratings")}
    on_cluster = client.post("/v1/ctr", json=REQUEST)
    single = gateway.post("/v1/ctr", json=REQUEST)
    assert on_cluster.status_code == 200, on_cluster.text
    assert [s["score"] for s in on_cluster.json()["scores"]] == \
        pytest.approx([s["score"] for s in single.json()["scores"]], abs=1e-6)


def test_point_in_time_features_match_a_single_server(cluster, cluster_gateway, redis_url):
    """The item statistics script reads one item's sets on one slot; vectors equal the single server's."""
    from service.feature_vector import FeatureSpec
    from service.features import FeatureReader
    from service.history import HistoryStore, connect
    from service.ingest import read_movielens

    url, _ = cluster
    data = read_movielens(ML100K)
    spec = FeatureSpec.of(data.items, data.profiles.values())
    direct = redis.RedisCluster.from_url(url)
    assert len({direct.keyslot(k) for k in Keys().item_buckets("50")}) == 1, "an item's sets share a slot"
    direct.close()

    async def vectors(redis_url: str, cluster_mode: bool):
        client = connect(redis_url, cluster_mode)
        try:
            history = HistoryStore(client, Keys(), 5000)
            context, items = await history.load_request("42", REQUEST["item_ids"], AS_OF)
            return await FeatureReader(history, spec).vectors(context, [items[i] for i in REQUEST["item_ids"]],
                                                              AS_OF)
        finally:
            await client.aclose()

    on_cluster, single = asyncio.run(vectors(url, True)), asyncio.run(vectors(redis_url, False))
    assert on_cluster.shape == (5, len(spec.names)) and (on_cluster == single).all()


def test_a_users_keys_share_a_slot_and_users_spread_over_the_nodes(cluster, cluster_gateway):
    url, nodes = cluster
    client, _ = cluster_gateway
    keys = Keys()
    events = [{"user_id": f"cluster-user-{u}", "item_id": str(1 + u), "ts": 900_000_000 + u, "rating": 4,
               "event_id": f"e-{u}"} for u in range(30)]
    assert client.post("/v1/events", json={"events": events}).json() == {"accepted": 30, "stored": 30}
    direct = redis.RedisCluster.from_url(url)
    owners = set()
    for u in range(30):
        user = f"cluster-user-{u}"
        slots = {direct.keyslot(k) for k in (keys.events(user), keys.event_ids(user))}
        assert len(slots) == 1, "a user's keys must hash to one slot"
        owners.add(direct.get_node_from_key(keys.events(user)).port)
    direct.close()
    assert len(owners) == 3, "30 users should land on every node"


def test_retried_batch_stores_nothing_twice_and_history_reads_back(cluster_gateway):
    client, _ = cluster_gateway
    events = [{"user_id": f"retry-{u % 5}", "item_id": str(10 + i), "ts": 900_000_100 + i, "rating": 5,
               "event_id": f"r-{i}"} for i, u in enumerate(range(20))]
    first = client.post("/v1/events", json={"events": events}).json()
    again = client.post("/v1/events", json={"events": events}).json()
    assert (first["stored"], again["stored"]) == (20, 0)
    history = client.get("/v1/users/retry-0/history").json()
    assert [e["item_id"] for e in history["events"]] == [str(10 + i) for i in range(0, 20, 5)]


def test_item_put_and_read_on_the_cluster(cluster_gateway):
    client, _ = cluster_gateway
    r = client.put("/v1/items/cluster-item-1", json={"title": "Cluster Movie", "year": 1999,
                                                     "genres": ["Drama"]})
    assert r.status_code == 200, r.text
    scored = client.post("/v1/ctr", json={"user_id": "42", "item_ids": ["cluster-item-1"]})
    assert scored.status_code == 200, scored.text


def test_dead_node_answers_503_naming_redis(cluster, cluster_gateway):
    url, nodes = cluster
    client, _ = cluster_gateway
    direct = redis.RedisCluster.from_url(url)
    port = direct.get_node_from_key(Keys().events("42")).port
    direct.close()
    nodes[port].stop()
    r = client.post("/v1/ctr", json=REQUEST)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["dependency"] == "redis"
