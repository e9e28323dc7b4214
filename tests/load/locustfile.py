"""Load test: product-backend traffic against a running gateway (ML-100K ids).

    locust -f tests/load/locustfile.py --headless -u 16 -r 4 -t 2m \
        --host http://127.0.0.1:8000 --csv benchmarks/results/locust

(`bash benchmarks/run_load.sh USERS DURATION RETRIEVAL` starts the stack and runs exactly this.)

Mostly `/v1/rank` with 20 candidates, some `/v1/ctr` and `/v1/events` (each with a client event id,
as a backend that retries would send). LOREC_API_KEY (scopes read and write) is sent as a bearer
token; LOREC_LOAD_MAX_REQUESTS bounds the run by count as `-t` bounds it by time, LOREC_LOAD_WAIT_S
("min,max") sets the pause between a user's requests, LOREC_LOAD_EVENT_USERS (comma-separated) whose
histories the events extend (default: the data's users) (benchmarks/soak.py). Not collected by pytest
(no test_ prefix); run it by hand or from the benchmark scripts.
"""

from __future__ import annotations

import os
import random
import time
import uuid

from locust import HttpUser, between, events, task

USERS = [str(u) for u in range(1, 944)]
ITEMS = [str(i) for i in range(1, 1683)]
EVENT_USERS = [u for u in os.environ.get("LOREC_LOAD_EVENT_USERS", "").split(",") if u] or USERS
MAX_REQUESTS = int(os.environ.get("LOREC_LOAD_MAX_REQUESTS", "0"))  # 0: no bound by count
WAIT_S = tuple(float(s) for s in os.environ.get("LOREC_LOAD_WAIT_S", "0.1,0.5").split(","))
_run = {"environment": None, "requests": 0}


@events.init.add_listener
def _keep_environment(environment, **_) -> None:
    _run["environment"] = environment


@events.request.add_listener
def _stop_at_the_bound(**_) -> None:
    _run["requests"] += 1
    if MAX_REQUESTS and _run["requests"] >= MAX_REQUESTS and _run["environment"].runner is not None:
        _run["environment"].runner.quit()


class Backend(HttpUser):
    wait_time = between(*WAIT_S)

    def on_start(self) -> None:
        key = os.environ.get("LOREC_API_KEY")
        if key:
            self.client.headers["authorization"] = f"Bearer {key}"

    @task(8)
    def rank(self) -> None:
        self.client.post("/v1/rank", json={"user_id": random.choice(USERS), "item_ids": random.sample(ITEMS, 20),
                                           "top_k": 10}, name="/v1/rank")

    @task(2)
    def ctr(self) -> None:
        self.client.post("/v1/ctr", json={"user_id": random.choice(USERS), "item_ids": random.sample(ITEMS, 5)},
                         name="/v1/ctr")

    @task(1)
    def events(self) -> None:
        event = {"event_id": uuid.uuid4().hex, "user_id": random.choice(EVENT_USERS), "item_id": random.choice(ITEMS),
                 "ts": int(time.time()),
                 "rating": random.randint(1, 5)}
        self.client.post("/v1/events", json={"events": [event]}, name="/v1/events")
