"""Stage 2, features: the gateway's vectors (from Redis) equal the trainer's (from the raw files), at as_of."""

from __future__ import annotations

import asyncio
import inspect
import math
from dataclasses import replace

import numpy as np
import pytest

from adapters.features import OfflineFeatures
from adapters.samples import build_samples, draw, split_by_time
from service.corating import CoRating
from service.feature_vector import (
    FeatureSpec,
    GenreSets,
    ItemStats,
    genre_membership,
    star,
    summarize_timeline,
)
from service.features import FeatureReader, GenreCache, started
from service.history import HistoryStore, Keys, connect
from service.ingest import read_movielens
from service.records import Behaviour, Item, Profile, Timeline, UserContext
from tests.utils.fakes import FakeHistory
from tests.utils.stack import ML100K


def run(coroutine):
    return asyncio.run(coroutine)


async def _online(redis_url: str, samples, spec: FeatureSpec) -> np.ndarray:
    redis = connect(redis_url)
    try:
        history = HistoryStore(redis, Keys(), 5000)  # the gateway's defaults
        reader = FeatureReader(history, spec)
        rows = []
        for s in samples:
            context, items = await history.load_request(s.user_id, [s.item_id], s.ts)
            rows.append((await reader.vectors(context, [items[s.item_id]], s.ts))[0])
        return np.asarray(rows)
    finally:
        await redis.aclose()


@pytest.mark.parametrize("neighbours", [None, "co-rating", "taste"],
                         ids=["base", "with-neighbours", "with-taste-neighbours"])
def test_online_features_equal_offline_features_of_the_same_samples(ingested, redis_url, neighbours):
    data = read_movielens(ML100K)
    parts = split_by_time(build_samples(data))
    spec = FeatureSpec.of(data.items, data.profiles.values())
    if neighbours:
        table = CoRating.fit(data.ratings, min(s.ts for s in parts["valid"]), taste=neighbours == "taste")
        spec = replace(spec, corating=table)
    offline = OfflineFeatures(data, spec)
    samples = [s for part in ("train", "valid", "test") for s in draw(parts[part], 60, 7)]
    online = run(_online(redis_url, samples, offline.spec))
    expected = offline.matrix(samples)
    assert online.shape == expected.shape == (180, len(offline.spec.names))
    assert np.array_equal(online, expected, equal_nan=True), [
        (offline.spec.names[c], online[r, c], expected[r, c]) for r, c in zip(*np.nonzero(online != expected))][:10]
    # The vectors carry signal a model can read: users and items differ, counts grow with time.
    names = list(offline.spec.names)
    assert len({row[names.index("i_mean")] for row in expected}) > 50
    assert expected[:60, names.index("i_n")].mean() < expected[120:, names.index("i_n")].mean()
    for name in ("n_top_sim", "t_top_sim", "t_knn_wmean"):  # defined for (nearly) every sample, not constant
        if name in names:
            top = expected[:, names.index(name)]
            assert np.isfinite(top).mean() > 0.95 and len(set(top[np.isfinite(top)])) > 100
    assert ("t_top_sim" in names) == (neighbours == "taste")


async def _features_around(redis_url: str, user: str, item: Item, t: int) -> tuple[np.ndarray, np.ndarray, int]:
    redis = connect(redis_url)
    try:
        history = HistoryStore(redis, Keys("lorec-asof"), 5000)
        spec = FeatureSpec(genres=("Drama",), occupations=())
        reader = FeatureReader(history, spec)
        first = await history.append_events([(user, Behaviour(item.item_id, t, 5.0), "e1"),
                                             (user, Behaviour(item.item_id, t, 5.0), "e1")])

        async def at(as_of: int) -> np.ndarray:
            context, _ = await history.load_request(user, [], as_of)
            return (await reader.vectors(context, [item], as_of))[0]

        return await at(t), await at(t + 1), first
    finally:
        await redis.aclose()


def test_an_event_at_t_is_invisible_at_as_of_t_and_visible_at_t_plus_1(redis_url):
    item = Item("asof-item", "A Film", 1990, ("Drama",))
    before, after, stored = run(_features_around(redis_url, "asof-user", item, 1_000_000))
    names = list(FeatureSpec(genres=("Drama",), occupations=()).names)
    assert stored == 1, "a retried event id stores once"
    assert before[names.index("u_n")] == 0 and before[names.index("i_n")] == 0
    assert after[names.index("u_n")] == 1 and after[names.index("i_n")] == 1, "written by /v1/events' path"
    assert after[names.index("i_share5")] == 1.0 and after[names.index("u_mean")] == 5.0
    assert np.all(np.isfinite(before)) and np.all(np.isfinite(after))


async def _conflicting_id(redis_url: str) -> tuple[int, ItemStats]:
    redis = connect(redis_url)
    try:
        history = HistoryStore(redis, Keys("lorec-ids"), 5000)
        await history.append_events([("u", Behaviour("i", 10, 4.0), "same-id")])
        stored = await history.append_events([("u", Behaviour("i", 20, 1.0), "same-id")])
        return stored, (await history.item_stats(["i"], None, 100))["i"]
    finally:
        await redis.aclose()


def test_an_event_refused_by_its_id_does_not_count_for_the_item(redis_url):
    stored, stats = run(_conflicting_id(redis_url))
    assert stored == 0
    assert stats.counts == (0, 0, 0, 1, 0, 0) and stats.recent == 1 and stats.first_ts == 10, \
        "only the first event under the id counts"


def test_cold_user_and_unrated_item_get_defined_features():
    spec = FeatureSpec(genres=("Comedy", "Drama"), occupations=("writer",))
    user = summarize_timeline(Timeline.of([]), GenreSets.dense(genre_membership([], lambda i: (), spec)), 1_000)
    from service.feature_vector import feature_vector

    row = feature_vector(spec, user, ItemStats.empty(), Item("x", "X"), Profile(), 1_000)
    assert len(row) == len(spec.names) and all(math.isfinite(v) for v in row)


@pytest.mark.parametrize("rating,expected", [(0.0, 1), (1.0, 1), (2.5, 3), (3.4, 3), (3.5, 4), (5.0, 5), (10, 5)])
def test_star_buckets(rating, expected):
    assert star(rating) == expected


def test_summary_of_a_history_counts_genres_and_recent_events():
    spec = FeatureSpec(genres=("Comedy", "Drama"), occupations=())
    genres = {"a": ("Comedy",), "b": ("Comedy", "Drama")}
    history = [Behaviour("a", 0, 2.0), Behaviour("b", 86_400 * 40, 5.0), Behaviour("a", 86_400 * 45, None)]
    membership = genre_membership([b.item_id for b in history], lambda i: genres.get(i, ()), spec)
    user = summarize_timeline(Timeline.of(history), GenreSets.dense(membership), 86_400 * 50)
    assert (user.n, user.clicks, user.liked, user.recent) == (2, 1, 1, 2)
    assert user.genre_n == (2, 1) and user.genre_sum == (7.0, 5.0) and user.genre_liked == (1, 1)
    assert user.last_ratings == (2.0, 5.0)


def test_features_of_context_without_history_or_profile(redis_url):
    async def go():
        redis = connect(redis_url)
        try:
            history = HistoryStore(redis, Keys("lorec-cold"), 5000)
            reader = FeatureReader(history, FeatureSpec(genres=("Drama",), occupations=()))
            return await reader.vectors(UserContext("nobody", Profile()), [Item("nothing", "N")], None)
        finally:
            await redis.aclose()

    rows = run(go())
    assert rows.shape == (1, len(FeatureSpec(genres=("Drama",), occupations=()).names))
    assert np.all(np.isfinite(rows))


class _Catalog:
    """The project's item loader (HistoryStore.items) over a dict, counting what it is asked for."""

    def __init__(self, genres: dict[str, tuple[str, ...]]) -> None:
        self.genres, self.asked = genres, []

    async def items(self, item_ids):
        ids = list(item_ids)
        self.asked.append(set(ids))
        return {i: Item(i, i, genres=self.genres[i]) if i in self.genres else None for i in ids}


def test_the_genre_cache_serves_the_catalogs_genres_within_its_ttl_then_reloads_in_the_background():
    spec = FeatureSpec(genres=("Comedy", "Drama", "Horror"), occupations=())
    catalog = _Catalog({"a": ("Comedy",), "b": ("Drama", "Comedy"), "c": ()})
    now = [0.0]
    cache = GenreCache(catalog.items, spec, ttl_s=60, clock=lambda: now[0])
    ids = ["a", "b", "a", "gone", "c", "b"]

    def expected():
        return genre_membership(ids, lambda i: catalog.genres.get(i, ()), spec)

    async def go():
        assert np.array_equal(await cache.membership(ids), expected()) and catalog.asked == [{"a", "b", "c", "gone"}]
        now[0] = 59.0
        assert np.array_equal(await cache.membership(ids), expected()) and len(catalog.asked) == 1, "cached"
        held = expected()
        catalog.genres["a"] = ("Horror",)
        now[0] = 60.0
        assert np.array_equal(await cache.membership(ids), held), "past the ttl: served as held, not waited for"
        assert np.array_equal(await cache.membership(ids), held) and len(catalog.asked) == 1
        await cache._reload  # one reload for both requests
        assert catalog.asked[1:] == [{"a", "b", "c", "gone"}]
        assert np.array_equal(await cache.membership(ids), expected()), "a changed item shows after the reload"
        assert await cache.membership(["d"]) is not None and catalog.asked[-1] == {"d"}, "an unknown item: waited"
        assert len(catalog.asked) == 3 and (await cache.membership([])).shape == (0, 3)

    run(go())


def test_a_failed_background_reload_keeps_serving_and_is_tried_again():
    spec = FeatureSpec(genres=("Comedy", "Drama"), occupations=())
    catalog = _Catalog({"a": ("Comedy",), "b": ("Drama",)})
    now, down = [0.0], [False]

    async def load(item_ids):
        if down[0]:
            raise ConnectionError("redis away")
        return await catalog.items(item_ids)

    cache = GenreCache(load, spec, ttl_s=60, clock=lambda: now[0])

    async def go():
        held = await cache.membership(["a", "b"])
        catalog.genres["b"] = ("Comedy",)
        now[0], down[0] = 61.0, True
        assert np.array_equal(await cache.membership(["a", "b"]), held)
        await cache._reload  # fails, logged
        assert np.array_equal(await cache.membership(["b"]), held[1:]), "still served as held"
        down[0] = False
        await cache._reload  # the request above started another
        assert (await cache.membership(["b"])).tolist() == [[1.0, 0.0]]

    run(go())


def test_the_genre_cache_stays_bounded_and_right_across_clears():
    spec = FeatureSpec(genres=("Comedy", "Drama"), occupations=())
    rng = np.random.default_rng(0)
    genres = {f"i{n}": tuple(g for g in spec.genres if rng.random() < 0.5) for n in range(50)}
    cache = GenreCache(_Catalog(genres).items, spec, max_items=12)
    for _ in range(30):
        ids = [f"i{n}" for n in rng.integers(0, 50, int(rng.integers(1, 10)))]
        assert np.array_equal(run(cache.membership(ids)), genre_membership(ids, lambda i: genres[i], spec))
        assert len(cache) <= 12


def test_the_genre_cache_gives_each_items_co_rating_row_across_clears():
    """The features stage looks a history up once: the cache's rows are the co-rating table's own."""
    spec = FeatureSpec(genres=("Comedy",), occupations=())
    ratings = [(f"u{u}", Behaviour(f"i{n}", 10 + n, 4.0)) for u in range(3) for n in range(0, 40, u + 1)]
    table = CoRating.fit(ratings, 1_000)
    genres = {f"i{n}": ("Comedy",) for n in range(50)}  # i40..i49 are in the catalog, not in the table
    cache = GenreCache(_Catalog(genres).items, replace(spec, corating=table), max_items=12)
    assert run(GenreCache(_Catalog(genres).items, spec).lookup(["i1", "i45"]))[1].tolist() == [-1, -1]
    rng = np.random.default_rng(1)
    for _ in range(30):
        ids = [f"i{n}" for n in rng.integers(0, 50, int(rng.integers(1, 10)))]
        genre_sets, rows = run(cache.lookup(ids))
        assert np.array_equal(rows, table.rows_of(ids))
        assert np.array_equal(genre_sets.membership(), genre_membership(ids, lambda i: genres[i], spec))
        assert (rows[[int(i[1:]) >= 40 for i in ids]] == -1).all()


class _WritesInATask(FakeHistory):
    """item_stats as redis-py 8 runs a command under a socket timeout on Python 3.11: the command is written
    from a task of its own (wait_for's), then the reply comes back. Records when each happens."""

    def __init__(self, *args, log: list[str], reply_error: Exception | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log, self.reply_error = log, reply_error

    async def item_stats(self, item_ids, as_of, now):
        async def write() -> None:
            self.log.append("stats written")
        await asyncio.wait_for(asyncio.ensure_future(write()), 5)
        await asyncio.sleep(0.01)  # the round trip
        if self.reply_error is not None:
            raise self.reply_error
        self.log.append("stats replied")
        return await super().item_stats(item_ids, as_of, now)

    async def items(self, item_ids):
        self.log.append("user side")  # the genres of the history: the first step of the user's side
        return await super().items(item_ids)


def _reader_and_context(log: list[str], **kwargs) -> tuple[FeatureReader, UserContext, Item]:
    item = Item("a", "A", 1990, ("Drama",))
    history = _WritesInATask([item], {"u": [Behaviour("a", 10, 4.0)]}, log=log, **kwargs)
    return (FeatureReader(history, FeatureSpec(genres=("Drama",), occupations=())),
            UserContext.of("u", Profile(), [Behaviour("a", 10, 4.0)]), item)


def test_the_item_statistics_are_on_the_wire_before_the_users_side_is_computed():
    log: list[str] = []
    reader, context, item = _reader_and_context(log)
    rows = run(reader.vectors(context, [item], 100))
    assert log == ["stats written", "user side", "stats replied"], "the round trip overlaps the user's side"
    assert rows.shape == (1, len(reader.spec.names))


def test_a_failed_users_side_raises_its_own_error_and_leaves_no_read_running():
    log: list[str] = []
    reader, context, item = _reader_and_context(log)

    async def failing_items(item_ids):
        raise ConnectionError("catalog unreachable")
    reader.genres.load = failing_items

    async def go():
        with pytest.raises(ConnectionError, match="catalog unreachable"):
            await reader.vectors(context, [item], 100)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert run(go()) == [], "no read left running"


def test_a_failed_statistics_read_raises_its_error():
    reader, context, item = _reader_and_context([], reply_error=TimeoutError("redis timed out"))
    with pytest.raises(TimeoutError, match="redis timed out"):
        run(reader.vectors(context, [item], 100))


async def _redis_like(name: str, log: list[str]) -> str:
    """A command as redis-py 8 sends it on Python 3.11: written from wait_for's task, then the round trip."""
    async def write() -> None:
        log.append(f"{name} written")
    await asyncio.wait_for(asyncio.ensure_future(write()), 5)
    await asyncio.sleep(0.01)
    log.append(f"{name} replied")
    return name


@pytest.mark.parametrize("behind", [False, True])
def test_a_read_started_behind_the_blocks_first_call_goes_out_after_it(behind):
    log: list[str] = []

    async def go():
        async with started(_redis_like("stats", log), behind=behind) as stats:
            await _redis_like("history", log)
            return await stats
    assert run(go()) == "stats"
    first = "history" if behind else "stats"
    assert log[0] == f"{first} written", "behind: the block's own call is on the wire first"
    assert sorted(log) == ["history replied", "history written", "stats replied", "stats written"]


def test_a_block_that_fails_before_a_read_behind_it_started_leaves_nothing_running():
    log: list[str] = []
    call = _redis_like("stats", log)

    async def go():
        with pytest.raises(KeyError):
            async with started(call, behind=True):
                raise KeyError("unknown item")
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert run(go()) == [] and log == [], "cancelled before its turns came: never sent"
    assert inspect.getcoroutinestate(call) == inspect.CORO_CLOSED, "closed, not left to warn 'never awaited'"
