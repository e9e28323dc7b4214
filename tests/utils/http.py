"""Calls to a gateway (a TestClient or an httpx client) that check the status and return the JSON body."""

from __future__ import annotations

import time


def post(client, path: str, body: dict, status: int = 200) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


def wait_ready(client, timeout_s: float = 300) -> dict:
    """Poll /readyz until the gateway is ready (its engine warm); the last body."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/readyz")
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return response.json()
        time.sleep(0.2)


def ctr(client, user_id: str, item_ids: list[str], as_of: int | None = None, **options):
    """POST /v1/ctr with these options; the response, whatever its status."""
    body = {"user_id": user_id, "item_ids": item_ids, "options": options}
    return client.post("/v1/ctr", json=body if as_of is None else {**body, "as_of": as_of})
