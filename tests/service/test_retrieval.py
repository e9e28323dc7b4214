"""One test suite for both ItemIndex implementations: Qdrant Edge (embedded) and qdrant-client.

The server implementation runs here against qdrant-client's local mode, which speaks the same
client API as a Qdrant server (compose and Kubernetes point QDRANT_URL at a real one). No Qdrant server
can run on these machines (no container engine, no download), so the remote faults are the two a network
gives: a port nothing listens on, and a peer that accepts the connection and never answers.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.processes import free_port
from service.records import Behaviour
from service.retrieval import brute_force_nearest, open_index, pick_subr, select_behaviours
from tests.utils.http import ctr
from tests.utils.stack import AUTH

N_ITEMS, DIM = 400, 32


@pytest.fixture(params=["edge", "qdrant-client"])
def index(request, tmp_path):
    url = None if request.param == "edge" else ":memory:"
    idx = open_index(url, None, "items", tmp_path / "edge")
    yield idx
    asyncio.run(idx.close())


def _vectors(seed=0):
    rng = np.random.default_rng(seed)
    return [f"m{i}" for i in range(N_ITEMS)], rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)


def test_nearest_within_history_matches_brute_force(index):
    ids, vectors = _vectors()

    async def run():
        await index.ensure(DIM)
        await index.upsert(ids, vectors)
        assert await index.count() == N_ITEMS
        allowed = ids[::3]
        hits = await index.nearest_within(vectors[:20], allowed, 10)
        return allowed, hits

    allowed, hits = asyncio.run(run())
    by_id = dict(zip(ids, vectors))
    for q, got in zip(vectors[:20], hits):
        assert [i for i, _ in got] == brute_force_nearest(q, {a: by_id[a] for a in allowed}, 10)
        assert set(i for i, _ in got) <= set(allowed)
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)


def test_subr_selection_is_nearest_k_in_time_order(index):
    ids, vectors = _vectors(1)
    rng = np.random.default_rng(2)
    history_ids = list(rng.choice(ids[:300], size=60, replace=False))
    behaviours = [Behaviour(item_id=i, ts=1000 + n, rating=float(n % 5 + 1)) for n, i in enumerate(history_ids)]
    targets = ["m350", "m351", "never-indexed"]

    async def run():
        await index.ensure(DIM)
        await index.upsert(ids, vectors)
        return await select_behaviours(index, behaviours, targets, 8, "subr")

    chosen = asyncio.run(run())
    by_id = dict(zip(ids, vectors))
    for target in targets[:2]:
        expected = brute_force_nearest(by_id[target], {i: by_id[i] for i in history_ids}, 8)
        assert sorted(b.item_id for b in chosen[target]) == sorted(expected)
        assert [b.ts for b in chosen[target]] == sorted(b.ts for b in chosen[target])
    assert chosen["never-indexed"] == behaviours[-8:], "a target without a vector falls back to recent"


def test_slate_selection_is_one_history_nearest_the_candidates_centroid(index):
    ids, vectors = _vectors(5)
    history_ids = ids[:80]
    behaviours = [Behaviour(item_id=i, ts=2000 - n) for n, i in enumerate(history_ids)][::-1]
    targets = ["m300", "m301", "m302", "never-indexed"]

    async def run():
        await index.ensure(DIM)
        await index.upsert(ids, vectors)
        return await select_behaviours(index, behaviours, targets, 6, "slate")

    chosen = asyncio.run(run())
    by_id = dict(zip(ids, vectors))
    units = [by_id[t] / np.linalg.norm(by_id[t]) for t in targets[:3]]
    expected = brute_force_nearest(np.mean(units, axis=0), {i: by_id[i] for i in history_ids}, 6)
    first = chosen[targets[0]]
    assert all(chosen[t] == first for t in targets), "one shared history for every candidate"
    assert sorted(b.item_id for b in first) == sorted(expected)
    assert [b.ts for b in first] == sorted(b.ts for b in first)


def test_equal_similarities_are_broken_by_item_id(index):
    ids, vectors = _vectors(4)
    twins = np.stack([vectors[0], vectors[0], vectors[0]])  # one title listed three times
    behaviours = [Behaviour(item_id=i, ts=n) for n, i in enumerate(["z-twin", "a-twin", "m-twin"] + ids[1:20])]

    async def run():
        await index.ensure(DIM)
        await index.upsert(ids + ["z-twin", "a-twin", "m-twin"], np.concatenate([vectors, twins]))
        return await select_behaviours(index, behaviours, [ids[0]], 2, "subr")

    chosen = asyncio.run(run())[ids[0]]
    assert [b.item_id for b in chosen] == ["a-twin", "m-twin"]  # time order of the two lowest ids


def test_short_history_is_used_whole_and_recent_mode_takes_the_last_k(index):
    behaviours = [Behaviour(item_id=f"m{i}", ts=i) for i in range(5)]
    assert asyncio.run(pick_subr(index, behaviours, ["m9"], 10)) == {"m9": behaviours}
    assert asyncio.run(select_behaviours(index, behaviours, ["a", "b"], 2, "recent")) == \
        {"a": behaviours[-2:], "b": behaviours[-2:]}


def test_reopened_edge_shard_keeps_points(tmp_path):
    ids, vectors = _vectors(3)

    async def write():
        idx = open_index(None, None, "items", tmp_path / "edge")
        await idx.ensure(DIM)
        await idx.upsert(ids[:10], vectors[:10])
        await idx.close()

    async def read():
        idx = open_index(None, None, "items", tmp_path / "edge")
        try:
            with pytest.raises(ValueError):
                await idx.ensure(DIM + 1)
            return idx.dim, await idx.count(), await idx.vectors(["m3"])
        finally:
            await idx.close()

    asyncio.run(write())
    dim, count, got = asyncio.run(read())
    assert (dim, count) == (DIM, 10)
    cos = got["m3"] @ vectors[3] / (np.linalg.norm(got["m3"]) * np.linalg.norm(vectors[3]))
    assert cos == pytest.approx(1.0, abs=1e-5)


def test_collection_is_created_with_the_configured_shards_and_replicas(tmp_path):
    """A distributed Qdrant gets LOREC_QDRANT_SHARDS / _REPLICAS when lorec creates the collection
    (qdrant-client's local mode ignores both, so the call itself is what is checked)."""
    from qdrant_client import AsyncQdrantClient

    from service.config import Settings
    from service.retrieval import open_configured_index

    created = {}

    class Recording(AsyncQdrantClient):
        async def create_collection(self, name, **kwargs):
            created.update(kwargs)
            return await super().create_collection(name, **kwargs)

    settings = Settings(qdrant_url="http://qdrant:6333", qdrant_shards=6, qdrant_replicas=2, data_dir=tmp_path)
    index = open_configured_index(settings.index, settings.edge_path)
    index.client = Recording(location=":memory:")
    asyncio.run(index.ensure(8))
    assert (created["shard_number"], created["replication_factor"]) == (6, 2)
    assert asyncio.run(index.count()) == 0


# --- a remote Qdrant unreachable or hung under the gateway (README, "Faults") ----------------------


ITEMS = ["1", "50", "100", "181"]


@pytest.fixture
def silent_peer():
    """A TCP peer that accepts connections and never answers (a hung Qdrant)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("peer", ["unreachable", "hung"])
def test_qdrant_unreachable_or_hung_degrades_to_recent_history(crm_fallback_settings, gateway, silent_peer, peer):
    url = f"http://127.0.0.1:{free_port()}" if peer == "unreachable" else silent_peer
    broken = crm_fallback_settings.replace(**{"qdrant_url": url, "retrieval_timeout_s": 0.5})
    with TestClient(create_app(broken), headers=AUTH) as client:
        started = time.monotonic()
        response = ctr(client, "1", ITEMS, retrieval="subr", return_prompt=True)
        assert time.monotonic() - started < 5
    assert response.status_code == 200, response.text
    assert response.json()["degraded"] == ["retrieval"]
    recent = ctr(gateway, "1", ITEMS, retrieval="recent", return_prompt=True).json()
    assert [s["prompt_token_ids"] for s in response.json()["scores"]] == \
        [s["prompt_token_ids"] for s in recent["scores"]], "the prompts are the recent-history prompts"
