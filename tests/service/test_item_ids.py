"""ItemPositions and EncodedIds (service/item_ids.py): the bytes path answers as the strings path does."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.history import SEP, decode_timeline
from service.item_ids import EncodedIds, GrowingArray, ItemPositions

# Ids as Redis gives them back: any text without control characters (surrogates have no UTF-8 bytes in Redis)
_ids = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=5)


def encoded(ids: list[str]) -> EncodedIds:
    """The ids as the history stage reads them: members parsed by the compiled decoder."""
    item_ids = decode_timeline([f"{i}{SEP}4{SEP}{n}" for n, i in enumerate(ids)]).item_ids
    assert isinstance(item_ids, EncodedIds) and item_ids == ids
    return item_ids


@settings(deadline=None)  # the first call loads the compiled probes
@given(st.lists(st.lists(_ids, max_size=40), min_size=1, max_size=4), st.lists(_ids, min_size=1, max_size=60))
def test_bytes_and_strings_find_the_same_positions(batches, asked):
    """Ids added in batches (the table grows and is rebuilt on the way), then looked up as bytes and as
    strings: the same positions, the order of first addition, -1 for ids never added."""
    index, order = ItemPositions(), {}
    for batch in batches:
        index.add(batch)
        for item_id in batch:
            order.setdefault(item_id, len(order))
    expected = [order.get(i, -1) for i in asked]
    assert index.positions(asked).tolist() == expected
    assert index.positions(encoded(asked)).tolist() == expected
    assert len(index) == len(order)


def test_ids_sharing_a_table_place_are_told_apart_by_their_bytes():
    """Many ids in a small table collide in its places; each still finds its own position, and ids that
    are prefixes of one another or differ only in a multi-byte character are different ids."""
    ids = ["1", "11", "111", "é", "e\u0301", "", "x" * 50, *(str(n) for n in range(300, 600))]
    index = ItemPositions(ids)
    asked = [*ids, "1111", "ée", "x" * 49, "0"]
    assert index.positions(encoded(asked)).tolist() == [*range(len(ids)), -1, -1, -1, -1]


def test_encoded_ids_make_strings_only_when_asked_and_slice_as_bytes():
    ids = decode_timeline([f"{i}{SEP}4{SEP}0" for i in ("a", "bé", "c")]).item_ids
    tail = ids[1:]
    assert isinstance(tail, EncodedIds) and tail._strings is None and ids._strings is None
    assert tail == ["bé", "c"] and ids[0] == "a" and list(ids[::2]) == ["a", "c"] and len(tail) == 2
    assert ids != ["a", "bé"] and ids != "abéc"
    assert ItemPositions(["c", "bé"]).positions(tail).tolist() == [1, 0]
    nothing = EncodedIds(np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert np.array_equal(ItemPositions(["a"]).positions(nothing), np.zeros(0, dtype=np.int64))


@given(st.lists(st.lists(st.integers(-2**40, 2**40), max_size=30), max_size=12))
def test_a_growing_array_holds_what_was_appended_and_earlier_views_keep_theirs(batches):
    grown, expected, views = GrowingArray(np.int64), np.zeros(0, dtype=np.int64), []
    for batch in batches:
        views.append((grown.values, expected.copy()))
        grown.extend(np.asarray(batch, dtype=np.int64))
        expected = np.concatenate([expected, batch]).astype(np.int64)
        assert np.array_equal(grown.values, expected) and len(grown) == len(expected)
    assert all(np.array_equal(view, seen) for view, seen in views)


def test_a_growing_array_reallocates_a_logarithmic_number_of_times():
    """One id at a time into a cache of 100,000 (a large catalog's warm-up): its buffer is replaced 15 times
    (8 -> 131,072 places), where np.concatenate copied everything held on each of the 100,000."""
    grown, buffers, buffer = GrowingArray(np.float64), 0, None
    for n in range(100_000):
        grown.extend(np.array([float(n)]))
        if grown.values.base is not buffer:
            buffers, buffer = buffers + 1, grown.values.base
    assert buffers == 15
    assert np.array_equal(grown.values, np.arange(100_000.0))
