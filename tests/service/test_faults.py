"""The fault matrix (README, "Faults"): each dependency stopped or killed for real, and what the gateway does.

Redis and vLLM are the real servers, stopped with SIGSTOP or killed with SIGKILL inside the test.
No Qdrant server can run on these machines (no container engine, no download), so the remote Qdrant
faults are the two a network gives: a port nothing listens on, and a peer that accepts the
connection and never answers.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.history import Keys
from service.processes import Managed, free_port, redis_command
from tests.utils.crm import build_crm
from tests.utils.metrics import metric_total
from tests.utils.stack import AFTER_DATA, AUTH, LOREC, ML100K, make_settings, serve_env, start_engine

ITEMS = ["1", "50", "100", "181"]
CRM = "fault-gbdt"


def ctr(client, **options):
    return client.post("/v1/ctr", json={"user_id": "1", "item_ids": ITEMS, "options": options})


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory, tiny_settings):
    """A data folder with a CRM (a real feature GBDT) for the LLM fallback."""
    data_dir = tmp_path_factory.mktemp("faults") / "data"
    build_crm(data_dir, ML100K, CRM)
    return data_dir


@pytest.fixture
def settings(tiny_settings, fault_dir):
    """The LLM alone by default, so that a fallback to the CRM is a degradation."""
    return tiny_settings.replace(**{"data_dir": fault_dir, "crm": CRM, "scorer": "llm"})


def degraded_llm_count(client) -> float:
    return metric_total(client.get("/metrics").text, "lorec_degraded_total", part="llm")


def crm_expected(client) -> list[float]:
    """The CRM's own answer to the same request (scorer crm: no engine involved)."""
    body = ctr(client, retrieval="recent", scorer="crm").json()
    assert body["scorer"] == "crm" and body["adapter_mode"] == "crm"
    return [s["score"] for s in body["scores"]]


# --- vLLM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spare_engine(workdir, tiny_model, redis_url):
    """A second tiny vLLM server that this module may stop and kill."""
    engine, url = start_engine(make_settings(workdir, tiny_model, redis_url), tiny_model,
                               workdir / "logs" / "vllm-spare.log")
    # A fresh engine's first batch is slow (warm-up); the tests' short deadlines are for later calls.
    httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": [[1, 2, 3]], "max_tokens": 1},
               timeout=300).raise_for_status()
    yield engine, url
    engine.stop()


def test_engine_stopped_then_killed_falls_back_to_the_crm_within_the_deadline(settings, spare_engine):
    engine, url = spare_engine
    # Two gateways at once: qdrant-client's local mode, since one Qdrant Edge shard opens in one place only.
    # The deadline leaves room for two engines sharing two cores (a healthy call takes ~1-4 s here).
    deadline = 10.0
    with_crm = settings.replace(**{"engine_url": url, "request_deadline_s": deadline,
                                           "qdrant_url": ":memory:"})
    no_crm = with_crm.replace(**{"crm": None})
    with TestClient(create_app(with_crm), headers=AUTH) as client, \
            TestClient(create_app(no_crm), headers=AUTH) as bare:
        # The first gateway-shaped prompt can still miss the deadline on a loaded machine: a few tries
        # to see the engine healthy before stopping it.
        for _ in range(3):
            started = time.monotonic()
            healthy = ctr(client, retrieval="recent")
            print(f"\nhealthy call on the spare engine: {time.monotonic() - started:.2f}s")
            if "degraded" not in healthy.json():
                break
        assert healthy.status_code == 200 and "degraded" not in healthy.json()
        expected = crm_expected(client)
        degraded_before = degraded_llm_count(client)

        os.killpg(engine.process.pid, signal.SIGSTOP)  # slow: the engine takes the request and never answers
        try:
            started = time.monotonic()
            slow = ctr(client, retrieval="recent")
            elapsed = time.monotonic() - started
            started = time.monotonic()
            timed_out = ctr(bare, retrieval="recent")
            elapsed_bare = time.monotonic() - started
        finally:
            os.killpg(engine.process.pid, signal.SIGCONT)
        assert slow.status_code == 200, slow.text
        assert slow.json()["degraded"] == ["llm"] and slow.json()["adapter_mode"] == "crm"
        assert slow.json()["scorer"] == "crm" and "logprob_yes" not in slow.json()["scores"][0]
        assert max(elapsed, elapsed_bare) < deadline + 2.0, f"answered after {elapsed:.1f}s, deadline {deadline}s"
        assert [s["score"] for s in slow.json()["scores"]] == pytest.approx(expected, abs=1e-6)
        assert timed_out.status_code == 504 and timed_out.json()["error"]["dependency"] == "vllm"
        assert ctr(client, retrieval="recent").json().get("degraded") is None, "back to the LLM once it answers"

        os.killpg(engine.process.pid, signal.SIGKILL)
        engine.process.wait(30)
        dead = ctr(client, retrieval="recent")
        assert dead.status_code == 200 and dead.json()["degraded"] == ["llm"]
        assert [s["score"] for s in dead.json()["scores"]] == pytest.approx(expected, abs=1e-6)
        assert degraded_llm_count(client) == degraded_before + 2
        unreachable = ctr(bare, retrieval="recent")
        assert unreachable.status_code == 503 and unreachable.json()["error"]["dependency"] == "vllm"


def test_engine_errors_fall_back_to_the_crm(settings, tiny_engine):
    # The real engine answers 404 for a model it does not serve: an erroring engine.
    erroring = settings.replace(**{"engine_model_name": "not-served-here"})
    with TestClient(create_app(erroring), headers=AUTH) as client:
        response = ctr(client, retrieval="recent")
        assert response.status_code == 200 and response.json()["degraded"] == ["llm"]
    with TestClient(create_app(erroring.replace(**{"crm": None})), headers=AUTH) as client:
        response = ctr(client, retrieval="recent")
        assert response.status_code == 503 and response.json()["error"]["dependency"] == "vllm"


# --- Qdrant -------------------------------------------------------------------------------


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
def test_qdrant_unreachable_or_hung_degrades_to_recent_history(settings, gateway, silent_peer, peer):
    url = f"http://127.0.0.1:{free_port()}" if peer == "unreachable" else silent_peer
    broken = settings.replace(**{"qdrant_url": url, "retrieval_timeout_s": 0.5})
    with TestClient(create_app(broken), headers=AUTH) as client:
        started = time.monotonic()
        response = ctr(client, retrieval="subr", return_prompt=True)
        assert time.monotonic() - started < 5
    assert response.status_code == 200, response.text
    assert response.json()["degraded"] == ["retrieval"]
    recent = ctr(gateway, retrieval="recent", return_prompt=True).json()
    assert [s["prompt_token_ids"] for s in response.json()["scores"]] == \
        [s["prompt_token_ids"] for s in recent["scores"]], "the prompts are the recent-history prompts"


# --- Redis --------------------------------------------------------------------------------


def test_redis_killed_answers_503_stores_nothing_and_recovers(tiny_settings, tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start_redis() -> Managed:
        server = Managed("redis-server", redis_command(tmp_path / "redis", port), tmp_path / "redis.log")
        server.wait_redis(url, 30)
        return server

    server = start_redis()
    settings = tiny_settings.replace(**{"redis_url": url, "data_dir": tmp_path / "data"})
    event = {"user_id": "r1", "item_id": "1", "ts": 10, "rating": 4}
    try:
        with TestClient(create_app(settings), headers=AUTH) as client:
            assert client.post("/v1/events", json={"events": [event]}).status_code == 200
            time.sleep(1.5)  # past AOF's one-second fsync window
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)
            for method, path, body in (("get", "/v1/users/r1/history", None),
                                       ("post", "/v1/events", {"events": [{**event, "ts": 11}]}),
                                       ("post", "/v1/ctr", {"user_id": "r1", "item_ids": ["1"]})):
                down = client.request(method, path, json=body)
                assert down.status_code in (503, 504) and down.json()["error"]["dependency"] == "redis", path
            server.stop()
            server = start_redis()
            for _ in range(10):  # automatic: the same gateway, no restart
                history = client.get("/v1/users/r1/history")
                if history.status_code == 200:
                    break
                time.sleep(0.5)
            assert history.status_code == 200, history.text
            assert [e["ts"] for e in history.json()["events"]] == [10], "acknowledged kept, refused not stored"
    finally:
        server.stop()


# --- the gateway itself -------------------------------------------------------------------


def test_gateway_killed_under_write_load_loses_no_acknowledged_event(tiny_settings, tmp_path):
    port = free_port()
    server = Managed("gateway", [LOREC, "serve"], tmp_path / "gateway.log",
                     env=serve_env(tiny_settings, tmp_path / "data", port))
    base = f"http://127.0.0.1:{port}"
    server.wait_http(f"{base}/healthz", 120)
    run = f"kill9-{time.time_ns()}"
    acked: dict[str, list[str]] = {}
    stop = threading.Event()

    def writer(n: int) -> None:
        user = f"{run}-{n}"
        acked[user] = []
        with httpx.Client(base_url=base, headers=AUTH, timeout=5) as client:
            for batch in range(10_000):
                if stop.is_set():
                    return
                events = [{"event_id": f"{user}-{batch}-{i}", "user_id": user, "item_id": str(1 + i),
                           "ts": AFTER_DATA + batch * 10 + i, "rating": 3} for i in range(10)]
                try:
                    response = client.post("/v1/events", json={"events": events})
                except httpx.TransportError:
                    return
                if response.status_code == 200:
                    acked[user] += [e["event_id"] for e in events]

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    os.killpg(server.process.pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(30)
    keys = Keys(tiny_settings.redis.prefix)
    client = redis.Redis.from_url(tiny_settings.redis.url, decode_responses=True)
    written = sum(len(ids) for ids in acked.values())
    found = sum(sum(client.hexists(keys.event_ids(user), i) for i in ids) for user, ids in acked.items())
    stored = sum(client.zcard(keys.events(user)) for user in acked)
    print(f"\nkill -9 under write load: {written} events acknowledged, {found} found, {stored} stored in all")
    server.stop()
    assert written > 0 and found == written and stored >= written
