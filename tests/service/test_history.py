"""The Redis key layout and codecs (service/history.py), and a real redis-server killed under the gateway."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.history import (
    SEP,
    Keys,
    _decode_strings,
    decode_event,
    decode_item,
    decode_timeline,
    encode_event,
    encode_item,
    history_bounds,
)
from service.item_ids import EncodedIds
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


@settings(deadline=None)  # the first call loads the compiled parser
@given(st.lists(behaviours, max_size=30))
def test_the_columnar_decode_gives_each_event_as_decode_event_does(events):
    members = [encode_event(b) for b in events]
    timeline = decode_timeline(members)
    assert not events or isinstance(timeline.item_ids, EncodedIds)  # the compiled parser took them all
    assert len(timeline) == len(events) and timeline.behaviours() == [decode_event(m) for m in members] == events
    assert timeline.ts.dtype.kind == "i" and timeline.ratings.dtype.kind == "f"
    assert UserContext.of("u", None, events).behaviours == events
    assert Timeline.of(events).tail(3).behaviours() == events[-3:]


# Field texts near the parser's canonical forms, and past them (what int() and float() read besides).
_numberish = st.text(st.sampled_from("0123456789.-+e _\u0663x\x1e\x1f"), max_size=20)
_ratings = st.sampled_from(["", "4", "4.5", "-0", "0.1", ".5", "5.", "-", ".", "1e3", "nan", " 3", "2_0",
                            "123456789012345", "1234567890123456", "0.3333333333333"]) | _numberish
_times = st.sampled_from(["0", "978300760", "-5", "007", "+5", "", "1_000", " 7", "999999999999999999",
                          "9999999999999999999"]) | _numberish
_members = st.builds(lambda i, r, t: f"{i}{SEP}{r}{SEP}{t}", st.text(min_size=0, max_size=6), _ratings, _times)


@settings(deadline=None)
@given(st.lists(_members | st.text(max_size=12), max_size=6))
def test_the_compiled_parser_reads_members_as_the_string_path_does(members):
    """Whatever the members, decode_timeline gives the string path's columns, or raises where it raises: the
    parser takes only what it reads exactly as int() and float() do, and hands the rest to the string path."""
    try:
        expected = _decode_strings(members) if members else None
    except (ValueError, OverflowError) as error:  # a malformed member; a time past int64
        with pytest.raises(type(error)):
            decode_timeline(members)
        return
    timeline = decode_timeline(members)
    if expected is None:
        assert len(timeline) == 0
        return
    assert list(timeline.item_ids) == list(expected.item_ids) and timeline.ts.tolist() == expected.ts.tolist()
    assert np.array_equal(timeline.ratings, expected.ratings, equal_nan=True)
    assert np.array_equal(np.signbit(timeline.ratings), np.signbit(expected.ratings))  # -0.0 stays -0.0


def test_canonical_members_take_the_compiled_path_with_exact_values():
    members = [f"é{SEP}0.1{SEP}5", f"b{SEP}{SEP}-3", f"{SEP}4.25{SEP}007", f"c{SEP}-0{SEP}0"]
    timeline = decode_timeline(members)
    assert isinstance(timeline.item_ids, EncodedIds)
    assert timeline.item_ids == ["é", "b", "", "c"] and timeline.ts.tolist() == [5, -3, 7, 0]
    assert timeline.ratings[0] == 0.1 and np.isnan(timeline.ratings[1]) and timeline.ratings[2] == 4.25
    assert np.signbit(timeline.ratings[3])
    assert timeline.tail(2).item_ids == ["", "c"] and isinstance(timeline.tail(2).item_ids, EncodedIds)


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
