"""API keys with scopes, the generated key of the embedded default, quiet logs.

(Adapter path confinement: tests/service/test_routing.py.)
"""

from __future__ import annotations

import json
import logging
import shutil
import stat

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import KeyRing, load_keyring, parse_keys
from service.config import Settings
from tests.utils.stack import ADMIN_KEY, AFTER_DATA, READ_KEY, WRITE_KEY

RANK = ("post", "/v1/rank", {"user_id": "1", "item_ids": ["1", "2"], "options": {"retrieval": "recent", "k": 2}})
EVENTS = ("post", "/v1/events",
          {"events": [{"user_id": "auth-user", "item_id": "1", "ts": AFTER_DATA + 5, "rating": 4}]})
HISTORY = ("get", "/v1/users/1/history", None)
ITEM = ("put", "/v1/items/auth-item", {"title": "Auth Test (2001)", "genres": ["Drama"]})
ADAPTERS = ("get", "/v1/adapters", None)


def call(client, request, key: str | None):
    method, path, body = request
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.request(method, path, json=body, headers=headers)


@pytest.fixture(scope="module")
def bare_client(tiny_settings, tmp_path_factory):
    """A gateway with no default headers, on a copy of the data folder (its own Qdrant Edge shard)."""
    data_dir = tmp_path_factory.mktemp("auth") / "data"
    shutil.copytree(tiny_settings.data_dir, data_dir)
    settings = tiny_settings.replace(**{"data_dir": data_dir})
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("request_, allowed", [
    (RANK, {ADMIN_KEY, READ_KEY}), (HISTORY, {ADMIN_KEY, READ_KEY}), (EVENTS, {ADMIN_KEY, WRITE_KEY}),
    (ITEM, {ADMIN_KEY, WRITE_KEY}), (ADAPTERS, {ADMIN_KEY})], ids=["rank", "history", "events", "item", "adapters"])
def test_each_route_needs_a_key_with_its_scope(bare_client, request_, allowed):
    missing = call(bare_client, request_, None)
    assert missing.status_code == 401 and missing.json()["error"]["field"] == "Authorization"
    assert call(bare_client, request_, "not-a-key-at-all-0000").status_code == 401
    for key in (ADMIN_KEY, READ_KEY, WRITE_KEY):
        response = call(bare_client, request_, key)
        if key in allowed:
            assert response.status_code == 200, (key, response.text)
        else:
            assert response.status_code == 403 and "scope" in response.json()["error"]["message"]
    assert bare_client.get("/healthz").status_code == 200, "probes stay open"


def test_adapters_route_lists_registry_and_loaded(gateway):
    gateway.post("/v1/rank", json={"user_id": "1", "item_ids": ["1"],
                                   "options": {"adapter": "tiny-random-v1", "retrieval": "recent"}})
    body = gateway.get("/v1/adapters").json()
    assert "tiny-random-v1" in body["registry"] and "tiny-random-v1" in body["loaded"]


def test_without_configured_keys_a_key_is_generated_printed_and_required(tiny_settings, tmp_path, capfd):
    settings = tiny_settings.replace(**{"api_keys": {}, "data_dir": tmp_path / "data"})
    with TestClient(create_app(settings)) as client:
        printed = capfd.readouterr().err
        key_file = tmp_path / "data" / "api-keys.json"
        (key,) = json.loads(key_file.read_text())
        assert key in printed and str(key_file) in printed
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert call(client, RANK, None).status_code == 401
        assert call(client, RANK, key).status_code == 200
    create_app(settings)  # a restart reuses the stored key and prints nothing
    assert key not in capfd.readouterr().err
    assert json.loads(key_file.read_text()) == {key: ["read", "write", "admin"]}


def test_keyring_rejects_short_keys_and_unknown_scopes():
    with pytest.raises(ValueError):
        parse_keys({"short": ["read"]})
    with pytest.raises(ValueError):
        parse_keys({"long-enough-key-000000": ["root"]})
    ring = KeyRing(parse_keys({"long-enough-key-000000": ["read"]}))
    assert ring.scopes("long-enough-key-000000") == {"read"}
    assert ring.scopes("long-enough-key-000001") is None and ring.scopes("") is None


def test_keys_and_prompts_stay_out_of_info_logs(gateway, caplog):
    with caplog.at_level(logging.INFO):
        body = gateway.post("/v1/ctr", json={"user_id": "1", "item_ids": ["50"],
                                             "options": {"return_prompt": True, "explain": True}}).json()
        gateway.post("/v1/ctr", json={"user_id": "1", "item_ids": ["50"]},
                     headers={"Authorization": "Bearer wrong-key-but-long-enough"})
    titles = [b["title"] for b in body["scores"][0]["why"]]
    logged = caplog.text
    assert ADMIN_KEY not in logged and "wrong-key-but-long-enough" not in logged
    assert not any(t in logged for t in titles), "prompt text (history titles) must not be logged at INFO"


def test_an_empty_key_file_stops_the_gateway_instead_of_running_open(tmp_path):
    key_file = tmp_path / "keys.json"
    key_file.write_text("{}")
    with pytest.raises(ValueError, match="holds no API key"):
        load_keyring(Settings(data_dir=tmp_path, api_keys={}, api_keys_file=key_file))
    assert json.loads(key_file.read_text()) == {}, "an operator's file is never overwritten"
