"""The Redis key layout and codecs (service/history.py), and a real redis-server killed under the gateway."""

from __future__ import annotations

import signal
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from service.app import create_app
from service.history import (
    SEP,
    Keys,
    decode_event,
    decode_item,
    decode_timeline,
    encode_event,
    encode_item,
    history_bounds,
)
from service.processes import Managed, free_port, redis_command
from service.records import Behaviour, Item, Timeline, UserContext
from tests.utils.stack import AUTH


def test_event_codec_round_trips_and_keys_share_a_cluster_slot():
    for b in (Behaviour("42", 978300760, 5.0), Behaviour("x:y", 1, None), Behaviour("7", 2, 3.5)):
        assert decode_event(encode_event(b)) == b
    keys = Keys("p")
    assert keys.events("u1") == "p:user:{u1}:events" and keys.profile("u1") == "p:user:{u1}:profile"
    assert history_bounds(None) == "+inf" and history_bounds(100) == "(100"
    item = Item("9", "Heat", 1995, ("Action", "Crime"))
    assert decode_item("9", encode_item(item)) == item
    assert decode_item("9", {}) is None


behaviours = st.builds(Behaviour, st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1),
                       st.integers(0, 2**40), st.none() | st.sampled_from([1.0, 2.5, 3.0, 4.5, 5.0, 0.5]))


@given(st.lists(behaviours, max_size=30))
def test_the_columnar_decode_gives_each_event_as_decode_event_does(events):
    members = [encode_event(b) for b in events]
    timeline = decode_timeline(members)
    assert len(timeline) == len(events) and timeline.behaviours() == [decode_event(m) for m in members] == events
    assert timeline.ts.dtype.kind == "i" and timeline.ratings.dtype.kind == "f"
    assert UserContext.of("u", None, events).behaviours == events
    assert Timeline.of(events).tail(3).behaviours() == events[-3:]


@pytest.mark.parametrize("members", [["1" + SEP + "4"], ["1" + SEP + "4" + SEP + "10" + SEP + "x"],
                                     ["1" + SEP + "4", "10" + SEP + "2" + SEP + "3" + SEP + "11"],
                                     ["1" + SEP + "4" + SEP + "later"]])
def test_a_malformed_member_is_refused_not_misaligned(members):
    """Two wrong members may add up to the right field count: the columns must not shift by one."""
    with pytest.raises(ValueError):
        decode_timeline(members)


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
