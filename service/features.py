"""Stage 2, features: point-in-time statistics of the user, the candidate and their match (the CRM's input).

A request at `as_of = t` sees only interactions strictly before t (the history's rule), and a
training sample sees only those before its own time: no statistic ever counts the label it predicts.

This stage reads what the vector needs from Redis: the user's history (already read by stage 1), the
genres of its items (cached), and each candidate's `ItemStats` (one script call over the candidates' rating
sets, one per item on a Redis Cluster, see history.py; it needs only the request, so the request sends it
right behind the history's read: `stats_read`); feature_vector.py turns them into the vector, exactly
as the trainer does from the raw files (adapters/features.py). A CRM with neighbour features adds them from
its co-rating table and the same history (corating.py, whose table is fixed at the CRM's training cutoff).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from service.corating import neighbour_rows
from service.feature_vector import (
    FeatureSpec,
    GenreSets,
    ItemStats,
    UserView,
    candidate_rows,
    compile_kernels,
    genre_membership,
    summarize_timeline,
    user_view,
)
from service.item_ids import GrowingArray, ItemPositions, strings_at
from service.records import Item, UserContext

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # history.py imports feature_vector for the bucket rule
    from service.history import HistoryStore

T = TypeVar("T")


def now_of(as_of: int | None, clock: Callable[[], float] = time.time) -> int:
    """The time features are computed at: the request's as_of, else the present."""
    return int(clock()) if as_of is None else as_of


SEND_TURNS = 2  # event-loop turns from a Redis call to its command on the wire (see `started`)


@asynccontextmanager
async def started(call: Coroutine[None, None, T], behind: bool = False) -> AsyncIterator[asyncio.Task[T]]:
    """`call` running as a task whose command is already written, so that work done in the block overlaps
    its round trip. redis-py writes a command from a task of its own under a socket timeout (Python 3.11's
    `wait_for`), two loop turns after the call starts: CPU work begun at once would hold the write back
    until it is done, and the round trip would add to it (~1.3 ms of a 2,000-event request here). `behind`:
    the block starts at once and the call SEND_TURNS turns later, so that the block's own first Redis call,
    the one awaited first, is on the wire (and served) before it. A block left before it awaited the task
    cancels it and waits for it to end (or retrieves its error: the block's own is the one raised): a failed
    request leaves no read running."""
    task = asyncio.ensure_future(_after_turns(call) if behind else call)
    try:
        if not behind:
            await _turns()
        yield task
    finally:
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        elif not task.cancelled():
            task.exception()
        call.close()  # a no-op once run; one cancelled before its turns came never starts, and warns unless closed


async def _turns() -> None:
    for _ in range(SEND_TURNS):
        await asyncio.sleep(0)


async def _after_turns(call: Coroutine[None, None, T]) -> T:
    await _turns()
    return await call


class GenreCache:
    """Which of the spec's genres each item has, kept in the gateway: a 2,000-event history would otherwise
    read 2,000 catalog entries per request. Items share rows by genre set (a few hundred distinct sets), so a
    history's membership matrix is one fancy index. An item held longer than `ttl_s` is reloaded in the
    background, and requests go on reading what is held meanwhile: a reload of a long history's items takes
    ~60 ms here, which a request that waited for it would add to its own time. So a changed item's genres reach
    other gateways' features within `ttl_s` and one reload. Only an item not held at all is waited for.

    Each item has a slot (its genre set's row, its expiry and its row in the spec's co-rating table, in
    arrays), so a request looks its history up once, for both the genres and the neighbour features, in
    compiled code over the bytes the history was read in (item_ids.py: 2,000 fresh strings to hash and probe
    cost more than either's arithmetic)."""

    def __init__(self, load: Callable[[Iterable[str]], Awaitable[Mapping[str, Item | None]]], spec: FeatureSpec,
                 ttl_s: float = 60.0, max_items: int = 500_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.load, self.spec, self.ttl_s, self.max_items, self.clock = load, spec, ttl_s, max_items, clock
        self._sets: dict[tuple[str, ...], int] = {}
        self._table = np.zeros((0, len(spec.genres)), dtype=np.float64)  # float: the summary's one product
        self._expired: set[str] = set()  # held past ttl_s, for the next reload
        self._reload: asyncio.Task[None] | None = None  # at most one running
        self._clear()

    def _clear(self) -> None:
        self._slots = ItemPositions()  # item -> its slot in the three arrays below
        self._row = GrowingArray(np.int64)  # slot -> row of its genre set in _table
        self._expiry = GrowingArray(np.float64)
        self._table_row = GrowingArray(np.int64)  # slot -> row in spec.corating (-1: none)

    def __len__(self) -> int:
        return len(self._slots)

    def _row_of(self, genres: tuple[str, ...]) -> int:
        key = tuple(sorted(genres))
        if key not in self._sets:
            self._sets[key] = len(self._sets)
            self._table = np.vstack([self._table, genre_membership(["x"], lambda _: key, self.spec)])
        return self._sets[key]

    async def membership(self, item_ids: Sequence[str]) -> np.ndarray:
        """(items, spec genres) 0/1, as genre_membership gives from the catalog."""
        return (await self.lookup(item_ids))[0].membership()

    async def lookup(self, item_ids: Sequence[str]) -> tuple[GenreSets, np.ndarray]:
        """The items' genre sets, and their rows in the spec's co-rating table (`CoRating.rows_of`; -1 for
        an item it does not hold, or all -1 without a table)."""
        now = self.clock()
        slots = self._slots.positions(item_ids)
        while (missing := slots < 0).any():  # again if another request cleared the cache while this one loaded
            wanted = set(strings_at(item_ids, np.flatnonzero(missing)))
            if len(self._slots) + len(wanted) > self.max_items:
                self._clear()  # a bounded memory; refilled on the next requests
                wanted = set(item_ids)
            self._store(await self.load(wanted), now)
            slots = self._slots.positions(item_ids)
        expired = self._expiry.values[slots] <= now
        if expired.any():
            self._reload_later(strings_at(item_ids, np.flatnonzero(expired)))
        # (_table is replaced, never changed; the fancy indexes copy)
        return GenreSets(self._row.values[slots], self._table), self._table_row.values[slots]

    def _reload_later(self, item_ids: Iterable[str]) -> None:
        """Reload these items in a task of their own (one at a time: items that expire meanwhile wait for the
        next). A reload that fails (Redis away) leaves them expired: the next request that reads one tries
        again, and until then they serve as they are."""
        self._expired.update(item_ids)
        if self._reload is None or self._reload.done():
            self._reload = asyncio.create_task(self._reload_expired())

    async def _reload_expired(self) -> None:
        wanted, self._expired = self._expired, set()
        try:
            items = await self.load(wanted)
        except Exception as error:  # noqa: BLE001 - the requests are served from the cache meanwhile
            log.warning("genre cache: reloading %d items failed (%s); they are served as held", len(wanted), error)
            return
        self._store({i: item for i, item in items.items() if i in self._slots}, self.clock())  # not cleared away
        self._expired -= wanted  # asked for again while this reload ran: it answered for them

    def _store(self, items: Mapping[str, Item | None], now: float) -> None:
        new = [i for i in items if i not in self._slots]
        self._slots.add(new)
        self._row.extend(np.zeros(len(new), dtype=np.int64))
        self._expiry.extend(np.zeros(len(new)))
        table = self.spec.corating
        self._table_row.extend(table.rows_of(new) if table is not None else np.full(len(new), -1, dtype=np.int64))
        rows, expiry = self._row.values, self._expiry.values
        for item_id, item in items.items():
            slot = self._slots[item_id]
            rows[slot] = self._row_of(item.genres if item is not None else ())
            expiry[slot] = now + self.ttl_s


@dataclass(frozen=True)
class RequestFeatures:
    rows: np.ndarray  # (targets, spec.names)
    user: list[float]  # spec.user_names: user_vector of the same summary


@dataclass(frozen=True)
class StatsRead:
    """The candidates' item statistics being read (ItemStats by item id), and the time they are read at."""

    now: int
    task: asyncio.Task[dict[str, ItemStats]]


class FeatureReader:
    """Stage 2 online: the feature vectors of a request's candidates, from Redis, at `as_of`."""

    def __init__(self, history: HistoryStore, spec: FeatureSpec, clock: Callable[[], float] = time.time) -> None:
        self.history, self.spec, self.clock = history, spec, clock
        self.genres = GenreCache(history.items, spec)  # with the rows of the spec's own co-rating table
        compile_kernels()

    @asynccontextmanager
    async def stats_read(self, item_ids: Sequence[str], as_of: int | None, behind: bool = False
                         ) -> AsyncIterator[StatsRead]:
        """The statistics of these items, read while the block runs (`started`). They need only the ids and
        as_of, so a request begins this read `behind` its history's: the history comes back first, and this
        round trip overlaps the history's instead of adding to the features stage."""
        now = now_of(as_of, self.clock)
        async with started(self.history.item_stats(list(item_ids), as_of, now), behind) as task:
            yield StatsRead(now, task)

    async def read(self, context: UserContext, targets: Sequence[Item], stats: StatsRead) -> RequestFeatures:
        """One row per target in `spec.names` order, and the user's side (`spec.user_names`), at the time of
        `stats`: a read of (at least) the targets' statistics, begun before. The user's side and the neighbour
        features, which do not need it, are computed while it comes."""
        view, neighbours = await self._user_side(context, targets, stats.now)
        item_stats = await stats.task
        rows = candidate_rows(self.spec, view, [item_stats[t.item_id] for t in targets], targets)
        if neighbours is not None:
            rows = np.hstack([rows, neighbours])
        return RequestFeatures(rows.reshape(len(targets), len(self.spec.names)), [*view.head, *view.means])

    async def _user_side(self, context: UserContext, targets: Sequence[Item], now: int
                         ) -> tuple[UserView, np.ndarray | None]:
        timeline = context.timeline
        genres, table_rows = await self.genres.lookup(timeline.item_ids)
        view = user_view(self.spec, summarize_timeline(timeline, genres, now), context.profile, now)
        if self.spec.corating is None:
            return view, None
        whole = [(0, len(timeline))] * len(targets)
        return view, neighbour_rows(self.spec.corating, context.user_id, [t.item_id for t in targets], timeline,
                                    whole, table_rows)

    async def vectors(self, context: UserContext, targets: Sequence[Item], as_of: int | None) -> np.ndarray:
        """The rows of `read`, its statistics read started here (and written before the user's side starts)."""
        async with self.stats_read([t.item_id for t in targets], as_of) as stats:
            return (await self.read(context, targets, stats)).rows
