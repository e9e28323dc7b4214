"""The Redis key layout and codecs (service/history.py)."""

from __future__ import annotations

from service.history import Keys, decode_event, decode_item, encode_event, encode_item, history_bounds
from service.records import Behaviour, Item


def test_event_codec_round_trips_and_keys_share_a_cluster_slot():
    for b in (Behaviour("42", 978300760, 5.0), Behaviour("x:y", 1, None), Behaviour("7", 2, 3.5)):
        assert decode_event(encode_event(b)) == b
    keys = Keys("p")
    assert keys.events("u1") == "p:user:{u1}:events" and keys.profile("u1") == "p:user:{u1}:profile"
    assert history_bounds(None) == "+inf" and history_bounds(100) == "(100"
    item = Item("9", "Heat", 1995, ("Action", "Crime"))
    assert decode_item("9", encode_item(item)) == item
    assert decode_item("9", {}) is None
