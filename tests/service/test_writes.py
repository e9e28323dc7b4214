"""The write path (service/writes.py): a retried event stored once, time order under concurrent writers,
and no acknowledged event lost when the gateway is killed (SIGKILL) under write load."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import threading
import time

import httpx
import redis

from service.history import Keys
from service.processes import Managed, free_port
from tests.utils.http import post
from tests.utils.stack import AFTER_DATA, AUTH, LOREC, serve_env


def test_a_retried_event_id_is_stored_once(gateway):
    user = f"idem-{time.time_ns()}"
    event = {"event_id": "evt-1", "user_id": user, "item_id": "1", "ts": AFTER_DATA + 100, "rating": 4}
    assert post(gateway, "/v1/events", {"events": [event]}) == {"accepted": 1, "stored": 1}
    retry = {**event, "rating": 2, "ts": AFTER_DATA + 101}  # same id, changed payload: still the first one counts
    assert post(gateway, "/v1/events", {"events": [retry, {**event, "event_id": "evt-2", "ts": AFTER_DATA + 102}]}) == \
        {"accepted": 2, "stored": 1}
    history = gateway.get(f"/v1/users/{user}/history").json()["events"]
    assert [(e["ts"], e["rating"]) for e in history] == [(AFTER_DATA + 100, 4.0), (AFTER_DATA + 102, 4.0)]


def test_concurrent_writers_for_one_user_keep_time_order(gateway):
    user = f"order-{time.time_ns()}"
    batches = [[{"user_id": user, "item_id": str(1 + (w * 25 + j) % 1682), "ts": AFTER_DATA + 1000 + w + 4 * j,
                 "rating": 3} for j in range(25)] for w in range(4)]
    for batch in batches:
        random.Random(0).shuffle(batch)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: post(gateway, "/v1/events", {"events": b}), batches))
    assert sum(r["stored"] for r in results) == 100
    stamps = [e["ts"] for e in gateway.get(f"/v1/users/{user}/history", params={"limit": 1000}).json()["events"]]
    assert stamps == sorted(stamps) and len(stamps) == 100


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
