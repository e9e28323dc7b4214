"""Item ids to positions for a request's whole history, without a Python string per event.

A history of 2,000 events read from Redis is one buffer of bytes; the features stage needs each event's
item's position in its caches (genre set, co-rating row). Made into 2,000 strings and looked up in a dict,
that cost ~0.65 ms of a ~4.4 ms stage here: each fresh string is hashed, and each probe touches a dict key
object that the request's other work has pushed out of the CPU cache. `EncodedIds` keeps the ids as the
bytes they were read in (UTF-8, one buffer and each id's span) and makes strings only when asked;
`ItemPositions` looks them up in compiled code over contiguous arrays (FNV-1a hashes, open addressing, each hit
checked byte for byte), and looks up plain lists of strings in a dict, with the same answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import overload

import numba
import numpy as np

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_EMPTY = -1  # a free place in the table
UTF8 = ("utf-8", "surrogatepass")  # a bijection on Python strings: every id has bytes, no two the same


class EncodedIds(Sequence[str]):
    """Item ids as read: `text` (uint8) holds id n at text[starts[n]:ends[n]], UTF-8."""

    __slots__ = ("text", "starts", "ends", "_strings")

    def __init__(self, text: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        self.text, self.starts, self.ends = text, starts, ends
        self._strings: list[str] | None = None

    def strings(self) -> list[str]:
        """The ids as strings, made on first use (the stages that show or search behaviours)."""
        if self._strings is None:
            self._strings = _decoded(self.text, self.starts, self.ends)
        return self._strings

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            if index.step not in (None, 1):
                return self.strings()[index]
            return EncodedIds(self.text, self.starts[index], self.ends[index])  # Timeline.tail: no strings
        return self.strings()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.strings())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and self.strings() == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-like: equal to lists, which do not hash

    def __repr__(self) -> str:
        return f"EncodedIds({self.strings()!r})"


def strings_at(ids: Sequence[str], indices: np.ndarray) -> list[str]:
    """ids[i] for i in indices, making strings of those alone where the ids are bytes."""
    if isinstance(ids, EncodedIds) and ids._strings is None:
        return _decoded(ids.text, ids.starts[indices], ids.ends[indices])
    return [ids[i] for i in indices.tolist()]


def _decoded(text: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[str]:
    raw = text.tobytes()
    return [raw[s:e].decode(*UTF8) for s, e in zip(starts.tolist(), ends.tolist())]


class GrowingArray:
    """A 1-d array that appends in amortised O(appended): spare capacity, doubled when full (np.concatenate
    would copy everything held on each append: a cache of 500k items that takes in a few new ones per request
    copied megabytes per request). `values` is a view of what is held; views taken before an append keep
    reading what they saw."""

    __slots__ = ("_buffer", "_size")

    def __init__(self, dtype: type, values: Iterable = ()) -> None:
        self._buffer, self._size = np.zeros(8, dtype=dtype), 0
        self.extend(np.fromiter(values, dtype=dtype))

    def __len__(self) -> int:
        return self._size

    @property
    def values(self) -> np.ndarray:
        return self._buffer[:self._size]

    def extend(self, values: np.ndarray) -> None:
        size = self._size + len(values)
        if size > len(self._buffer):
            grown = np.zeros(max(size, 2 * len(self._buffer)), dtype=self._buffer.dtype)
            grown[:self._size] = self.values
            self._buffer = grown
        self._buffer[self._size:size] = values
        self._size = size


class ItemPositions:
    """Item id -> position, in the order ids were added: `positions` of a list by a dict, of `EncodedIds` by
    compiled probes of a hash table over the ids' bytes (no strings made); -1 for an id it does not hold."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._position: dict[str, int] = {}
        self._keys = GrowingArray(np.uint8)  # every id's bytes, in position order
        self._key_starts = GrowingArray(np.int64, [0])  # id n: _keys[_key_starts[n]:_key_starts[n + 1]]
        self._hashes = GrowingArray(np.uint64)  # id n's FNV-1a hash
        self._table = np.full(8, _EMPTY, dtype=np.int64)  # open addressing: a position or _EMPTY
        self.add(ids)

    def __len__(self) -> int:
        return len(self._position)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._position

    def __getitem__(self, item_id: str) -> int:
        return self._position[item_id]

    def add(self, ids: Iterable[str]) -> None:
        """Give each id not yet held the next position."""
        new = [i for i in dict.fromkeys(ids) if i not in self._position]
        if not new:
            return
        self._position.update(zip(new, range(len(self._position), len(self._position) + len(new))))
        encoded = [i.encode(*UTF8) for i in new]
        self._keys.extend(np.frombuffer(b"".join(encoded), dtype=np.uint8))
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        self._key_starts.extend(self._key_starts.values[-1] + np.cumsum(lengths))
        starts = self._key_starts.values
        self._hashes.extend(_hashes(self._keys.values, starts[-len(new) - 1:-1], starts[-len(new):]))
        if 2 * len(self._position) > len(self._table):  # at most half full: probes stay short
            size = len(self._table)
            while 2 * len(self._position) > size:
                size *= 2
            self._table = np.full(size, _EMPTY, dtype=np.int64)
            _insert(self._table, self._hashes.values, 0)
        else:
            _insert(self._table, self._hashes.values, len(self._position) - len(new))

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """Each id's position (int64), -1 where it has none."""
        if isinstance(ids, EncodedIds):
            return _probe(ids.text, ids.starts, ids.ends, self._table, self._hashes.values, self._keys.values,
                          self._key_starts.values)
        return positions(self._position, ids)


def positions(index: Mapping[str, int], keys: Sequence[str]) -> np.ndarray:
    """Each key's position in `index`, -1 where it has none (one C-level pass)."""
    return np.fromiter(map(index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))


@numba.njit(cache=True, nogil=True)
def _hash(text: np.ndarray, start: int, end: int) -> np.uint64:  # pragma: no cover - compiled
    h = _FNV_OFFSET
    for k in range(start, end):
        h = (h ^ np.uint64(text[k])) * _FNV_PRIME
    return h


@numba.njit(cache=True, nogil=True)
def _hashes(text: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty(len(starts), dtype=np.uint64)
    for n in range(len(starts)):
        out[n] = _hash(text, starts[n], ends[n])
    return out


@numba.njit(cache=True, nogil=True)
def _insert(table: np.ndarray, hashes: np.ndarray, first: int) -> None:  # pragma: no cover - compiled
    """Place positions first.. of `hashes` in `table` (linear probing; never full: the caller keeps it half)."""
    mask = np.uint64(len(table) - 1)
    for position in range(first, len(hashes)):
        place = hashes[position] & mask
        while table[place] != _EMPTY:
            place = (place + np.uint64(1)) & mask
        table[place] = position


@numba.njit(cache=True, nogil=True)
def _probe(text: np.ndarray, starts: np.ndarray, ends: np.ndarray, table: np.ndarray, hashes: np.ndarray,
           keys: np.ndarray, key_starts: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Each id's position: the place its hash names, then on along the table to a key of the same bytes (an
    equal hash alone is not a match) or a free place (none)."""
    mask = np.uint64(len(table) - 1)
    out = np.full(len(starts), -1, dtype=np.int64)
    for n in range(len(starts)):
        start, length = starts[n], ends[n] - starts[n]
        h = _hash(text, start, ends[n])
        place = h & mask
        while table[place] != _EMPTY:
            position = table[place]
            key = key_starts[position]
            if hashes[position] == h and key_starts[position + 1] - key == length:
                same = True
                for k in range(length):
                    if keys[key + k] != text[start + k]:
                        same = False
                        break
                if same:
                    out[n] = position
                    break
            place = (place + np.uint64(1)) & mask
    return out
