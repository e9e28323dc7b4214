"""Calls to a gateway (a TestClient or an httpx client) that check the status and return the JSON body."""

from __future__ import annotations


def post(client, path: str, body: dict, status: int = 200) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()
