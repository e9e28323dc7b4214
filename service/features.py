"""Stage 2, features: point-in-time statistics of the user, the candidate and their match (the CRM's input).

A request at `as_of = t` sees only interactions strictly before t (the history's rule), and a
training sample sees only those before its own time: no statistic ever counts the label it predicts.

Each input is first reduced to exact aggregates (counts, sums of star ratings), and only then
divided, by one function (`feature_vector`), so the gateway (one request, from Redis) and the
trainer (every sample, from prefix sums over timelines) produce bit-identical vectors:

- `UserSummary`: the user's history as the request sees it (the newest events, capped like the
  history read), with per-genre counts and sums over the catalog's genres;
- `ItemStats`: every user's ratings of the item before t, counted per star (1..5, a rating rounds
  to the nearest star) and clicks, those of the last 30 days, and the first one's time (Redis keeps
  one sorted set per item and star, see history.py; offline, sorted arrays of times);
- the profile and the candidate's catalog entry.

Sums of ratings are exact in float64 for star and half-star ratings, whatever the summation order.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from service.records import Behaviour, Item, Profile, UserContext

if TYPE_CHECKING:  # history.py imports this module for the bucket rule
    from service.history import HistoryStore

DAY_S = 86_400
RECENT_S = 30 * DAY_S  # "recent" activity: the 30 days before t
LAST = 10  # the user's last ratings
PRIOR_MEAN, PRIOR_LIKE = 3.5, 0.5  # smoothing targets of an item's mean rating and liked share
ITEM_PRIOR_WEIGHT = 10  # pseudo-ratings behind an item's smoothed statistics
GENRE_PRIOR_WEIGHT = 5  # pseudo-ratings (at the user's own mean) behind a user's genre statistics
STARS = (1, 2, 3, 4, 5)
BUCKETS = ("1", "2", "3", "4", "5", "click")  # an item's rating buckets (Redis: one sorted set each)
GENDERS = {"male": 1.0, "female": 0.0}
_FIRST_NUMBER = re.compile(r"\d+")

USER_FEATURES = ("u_n", "u_clicks", "u_mean", "u_std", "u_like", "u_last_rating", "u_last10_mean",
                 "u_last10_like", "u_days_first", "u_days_last", "u_days_last10", "u_recent")
MATCH_FEATURES = ("ug_share", "ug_mean", "ug_like", "ug_dev", "ug_max", "ug_min", "ui_diff")
ITEM_FEATURES = ("i_n", "i_clicks", "i_mean", "i_like", "i_std", "i_share1", "i_share2", "i_share3", "i_share4",
                 "i_share5", "i_recent", "i_days_first", "i_year", "i_age", "i_ngenres")
PROFILE_FEATURES = ("p_gender", "p_age", "p_occupation")
CATEGORICAL = ("p_gender", "p_occupation")


def star(rating: float) -> int:
    """The star bucket of a rating: nearest whole star (halves round up), clipped to 1..5."""
    return min(5, max(1, math.floor(rating + 0.5)))


def bucket(rating: float | None) -> str:
    return "click" if rating is None else str(star(rating))


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature vector means: the catalog's genres and the profiles' occupations, in a fixed order
    (part of the CRM artifact, so the gateway builds the vectors the CRM was trained on)."""

    genres: tuple[str, ...]
    occupations: tuple[str, ...]

    @classmethod
    def of(cls, items: Iterable[Item], profiles: Iterable[Profile]) -> FeatureSpec:
        return cls(genres=tuple(sorted({g for i in items for g in i.genres})),
                   occupations=tuple(sorted({p.occupation for p in profiles if p.occupation})))

    @property
    def names(self) -> tuple[str, ...]:
        return (*USER_FEATURES, *MATCH_FEATURES, *ITEM_FEATURES, *PROFILE_FEATURES,
                *(f"g_{g}" for g in self.genres))

    @property
    def user_names(self) -> tuple[str, ...]:
        """The user side alone (RecLoRA's gate reads it): user statistics, profile, genre affinities."""
        return (*USER_FEATURES, *PROFILE_FEATURES, *(f"ug_{g}" for g in self.genres))

    def genre_index(self) -> dict[str, int]:
        return {g: i for i, g in enumerate(self.genres)}


@dataclass(frozen=True, slots=True)
class UserSummary:
    """Exact aggregates of the history a request (or sample) sees."""

    n: int  # rated behaviours
    clicks: int
    rating_sum: float
    rating_sq: float
    liked: int  # ratings > 3
    first_ts: int | None
    last_ts: int | None
    recent: int  # behaviours in the RECENT_S before now
    last_ratings: tuple[float, ...]  # the last LAST ratings, oldest first
    last_ratings_from: int | None  # time of the oldest of them
    genre_n: tuple[int, ...]  # per spec genre: rated behaviours of items with that genre
    genre_sum: tuple[float, ...]
    genre_liked: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ItemStats:
    """An item's ratings by every user strictly before t: count per star and clicks (BUCKETS order),
    the same over the RECENT_S before t, and the earliest one's time."""

    counts: tuple[int, ...]
    recent: tuple[int, ...]
    first_ts: int | None

    @classmethod
    def empty(cls) -> ItemStats:
        return cls((0,) * len(BUCKETS), (0,) * len(BUCKETS), None)


def _last_ratings(behaviours: Sequence[Behaviour], start: int, end: int) -> tuple[tuple[float, ...], int | None]:
    """The last LAST ratings of behaviours[start:end], oldest first, and the time of the oldest."""
    picked: list[Behaviour] = []
    for i in range(end - 1, start - 1, -1):
        if behaviours[i].rating is not None:
            picked.append(behaviours[i])
            if len(picked) == LAST:
                break
    picked.reverse()
    return tuple(b.rating for b in picked), (picked[0].ts if picked else None)


def summarize_history(behaviours: Sequence[Behaviour], genres_of: Callable[[str], Sequence[str]],
                      spec: FeatureSpec, now: int) -> UserSummary:
    """The online path: one request's history (time order), item genres from the catalog."""
    index = spec.genre_index()
    n = clicks = liked = recent = 0
    total = squares = 0.0
    genre_n, genre_sum, genre_liked = [0] * len(index), [0.0] * len(index), [0] * len(index)
    for b in behaviours:
        recent += b.ts >= now - RECENT_S
        if b.rating is None:
            clicks += 1
            continue
        n += 1
        total += b.rating
        squares += b.rating * b.rating
        like = b.rating > 3
        liked += like
        for g in genres_of(b.item_id):
            if (gi := index.get(g)) is not None:
                genre_n[gi] += 1
                genre_sum[gi] += b.rating
                genre_liked[gi] += like
    last, last_from = _last_ratings(behaviours, 0, len(behaviours))
    return UserSummary(n=n, clicks=clicks, rating_sum=total, rating_sq=squares, liked=liked,
                       first_ts=behaviours[0].ts if behaviours else None,
                       last_ts=behaviours[-1].ts if behaviours else None, recent=recent, last_ratings=last,
                       last_ratings_from=last_from, genre_n=tuple(genre_n), genre_sum=tuple(genre_sum),
                       genre_liked=tuple(genre_liked))


class TimelineSums:
    """The offline path: prefix sums over one user's timeline, so the summary of any window
    timeline[start:end] costs O(genres) instead of O(window)."""

    def __init__(self, timeline: Sequence[Behaviour], genres_of: Callable[[str], Sequence[str]],
                 spec: FeatureSpec) -> None:
        index = spec.genre_index()
        rows = len(timeline)
        rated = np.array([b.rating is not None for b in timeline], dtype=np.int64)
        ratings = np.array([b.rating or 0.0 for b in timeline], dtype=np.float64)
        likes = (ratings > 3).astype(np.int64) * rated
        membership = np.zeros((rows, len(index)), dtype=np.int64)
        for row, b in enumerate(timeline):
            if b.rating is not None:
                for g in genres_of(b.item_id):
                    if (gi := index.get(g)) is not None:
                        membership[row, gi] = 1

        def cumulative(values: np.ndarray) -> np.ndarray:
            return np.concatenate([np.zeros((1, *values.shape[1:]), values.dtype), np.cumsum(values, axis=0)])

        self.timeline = timeline
        self.ts = [b.ts for b in timeline]
        self.rated, self.total = cumulative(rated), cumulative(ratings)
        self.squares, self.liked = cumulative(ratings * ratings), cumulative(likes)
        self.genre_n = cumulative(membership)
        self.genre_sum = cumulative(membership * ratings[:, None])
        self.genre_liked = cumulative(membership * likes[:, None])

    def summary(self, start: int, end: int, now: int) -> UserSummary:
        n = int(self.rated[end] - self.rated[start])
        last, last_from = _last_ratings(self.timeline, start, end)
        recent_from = max(start, bisect.bisect_left(self.ts, now - RECENT_S))
        return UserSummary(
            n=n, clicks=(end - start) - n, rating_sum=float(self.total[end] - self.total[start]),
            rating_sq=float(self.squares[end] - self.squares[start]),
            liked=int(self.liked[end] - self.liked[start]),
            first_ts=self.ts[start] if end > start else None, last_ts=self.ts[end - 1] if end > start else None,
            recent=max(0, end - recent_from), last_ratings=last, last_ratings_from=last_from,
            genre_n=tuple(int(v) for v in self.genre_n[end] - self.genre_n[start]),
            genre_sum=tuple(float(v) for v in self.genre_sum[end] - self.genre_sum[start]),
            genre_liked=tuple(int(v) for v in self.genre_liked[end] - self.genre_liked[start]))


class ItemTimes:
    """The offline path of ItemStats: per item and bucket, the sorted times of its ratings."""

    def __init__(self, ratings: Iterable[tuple[str, Behaviour]]) -> None:
        seen: set[tuple[str, str, float | None, int]] = set()  # Redis stores an identical event once
        times: dict[str, list[list[int]]] = {}
        for user_id, b in ratings:
            key = (user_id, b.item_id, b.rating, b.ts)
            if key in seen:
                continue
            seen.add(key)
            times.setdefault(b.item_id, [[] for _ in BUCKETS])[BUCKETS.index(bucket(b.rating))].append(b.ts)
        self.times = {item: [sorted(ts) for ts in buckets] for item, buckets in times.items()}

    def stats(self, item_id: str, before: int) -> ItemStats:
        buckets = self.times.get(item_id)
        if buckets is None:
            return ItemStats.empty()
        counts = tuple(bisect.bisect_left(ts, before) for ts in buckets)
        recent = tuple(c - bisect.bisect_left(ts, before - RECENT_S) for c, ts in zip(counts, buckets))
        firsts = [ts[0] for ts, c in zip(buckets, counts) if c]
        return ItemStats(counts, recent, min(firsts) if firsts else None)


def _ratio(a: float, b: float, default: float) -> float:
    return a / b if b else default


def _days(now: int, then: int | None) -> float:
    return -1.0 if then is None else (now - then) / DAY_S


def _number(text: str | None) -> float:
    match = _FIRST_NUMBER.search(text or "")
    return float(match.group()) if match else -1.0


def user_features(spec: FeatureSpec, user: UserSummary, profile: Profile, now: int) -> list[float]:
    mean = _ratio(user.rating_sum, user.n, PRIOR_MEAN)
    variance = _ratio(user.rating_sq, user.n, mean * mean) - mean * mean
    last = user.last_ratings
    return [float(user.n), float(user.clicks), mean, math.sqrt(max(variance, 0.0)), _ratio(user.liked, user.n, 0.0),
            last[-1] if last else 0.0, _ratio(sum(last), len(last), PRIOR_MEAN),
            _ratio(sum(r > 3 for r in last), len(last), 0.0), _days(now, user.first_ts), _days(now, user.last_ts),
            _days(now, user.last_ratings_from), float(user.recent),
            *profile_features(spec, profile)]


def profile_features(spec: FeatureSpec, profile: Profile) -> list[float]:
    occupation = spec.occupations.index(profile.occupation) if profile.occupation in spec.occupations else -1
    return [GENDERS.get(profile.gender or "", -1.0), _number(profile.age), float(occupation)]


def genre_means(spec: FeatureSpec, user: UserSummary) -> list[float]:
    """The user's smoothed mean rating per spec genre (pulled to their own mean where they rated few)."""
    mean = _ratio(user.rating_sum, user.n, PRIOR_MEAN)
    return [(s + GENRE_PRIOR_WEIGHT * mean) / (c + GENRE_PRIOR_WEIGHT) for c, s in zip(user.genre_n, user.genre_sum)]


def user_vector(spec: FeatureSpec, user: UserSummary, profile: Profile, now: int) -> list[float]:
    """The user side alone, in `spec.user_names` order."""
    return [*user_features(spec, user, profile, now), *genre_means(spec, user)]


def feature_vector(spec: FeatureSpec, user: UserSummary, item_stats: ItemStats, target: Item, profile: Profile,
                   now: int) -> list[float]:
    """The CRM's input for one (user, candidate) at time `now`, in `spec.names` order."""
    head = user_features(spec, user, profile, now)
    u_features, p_features = head[:len(USER_FEATURES)], head[len(USER_FEATURES):]
    u_mean = u_features[2]
    index = spec.genre_index()
    mine = sorted({index[g] for g in target.genres if g in index})
    means = genre_means(spec, user)
    g_means = [means[g] for g in mine]
    g_like = [(user.genre_liked[g] + GENRE_PRIOR_WEIGHT * PRIOR_LIKE) / (user.genre_n[g] + GENRE_PRIOR_WEIGHT)
              for g in mine]
    g_mean = _ratio(sum(g_means), len(g_means), u_mean)
    counts = item_stats.counts
    n = sum(counts[:5])
    total = sum(s * c for s, c in zip(STARS, counts))
    i_mean = (total + ITEM_PRIOR_WEIGHT * PRIOR_MEAN) / (n + ITEM_PRIOR_WEIGHT)
    raw_mean = _ratio(total, n, PRIOR_MEAN)
    i_var = _ratio(sum(s * s * c for s, c in zip(STARS, counts)), n, raw_mean * raw_mean) - raw_mean * raw_mean
    year = datetime.fromtimestamp(now, UTC).year
    match = [_ratio(sum(user.genre_n[g] for g in mine), user.n * max(len(mine), 1), 0.0), g_mean,
             _ratio(sum(g_like), len(g_like), PRIOR_LIKE), g_mean - u_mean, max(g_means, default=u_mean),
             min(g_means, default=u_mean), u_mean - i_mean]
    item = [float(n), float(counts[5]), i_mean,
            (counts[3] + counts[4] + ITEM_PRIOR_WEIGHT * PRIOR_LIKE) / (n + ITEM_PRIOR_WEIGHT),
            math.sqrt(max(i_var, 0.0)), *(_ratio(c, n, 0.0) for c in counts[:5]), float(sum(item_stats.recent)),
            _days(now, item_stats.first_ts), float(target.year or -1), float(year - target.year) if target.year
            else -1.0, float(len(target.genres))]
    flags = [1.0 if g in target.genres else 0.0 for g in spec.genres]
    return [*u_features, *match, *item, *p_features, *flags]


def now_of(as_of: int | None, clock: Callable[[], float] = time.time) -> int:
    """The time features are computed at: the request's as_of, else the present."""
    return int(clock()) if as_of is None else as_of


def catalog_genres(catalog: Mapping[str, Item]) -> Callable[[str], Sequence[str]]:
    def genres_of(item_id: str) -> Sequence[str]:
        item = catalog.get(item_id)
        return item.genres if item is not None else ()
    return genres_of


class GenreCache:
    """Item genres for the user summaries, kept in the gateway for `ttl_s`: a 2,000-event history would
    otherwise read 2,000 catalog entries per request. A changed item's genres reach the features of
    other gateways within `ttl_s`."""

    def __init__(self, load: Callable[[Iterable[str]], Awaitable[Mapping[str, Item | None]]], ttl_s: float = 60.0,
                 max_items: int = 500_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.load, self.ttl_s, self.max_items, self.clock = load, ttl_s, max_items, clock
        self._entries: dict[str, tuple[tuple[str, ...], float]] = {}

    async def lookup(self, item_ids: Iterable[str]) -> dict[str, tuple[str, ...]]:
        now = self.clock()
        found, missing = {}, []
        for item_id in set(item_ids):
            entry = self._entries.get(item_id)
            if entry is not None and entry[1] > now:
                found[item_id] = entry[0]
            else:
                missing.append(item_id)
        if missing:
            if len(self._entries) + len(missing) > self.max_items:
                self._entries.clear()  # a bounded memory; refilled on the next requests
            for item_id, item in (await self.load(missing)).items():
                genres = item.genres if item is not None else ()
                self._entries[item_id] = (genres, now + self.ttl_s)
                found[item_id] = genres
        return found


class FeatureReader:
    """Stage 2 online: the feature vectors of a request's candidates, from Redis, at `as_of`."""

    def __init__(self, history: HistoryStore, spec: FeatureSpec, genres: GenreCache | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.history, self.spec, self.clock = history, spec, clock
        self.genres = genres or GenreCache(history.items)

    async def vectors(self, context: UserContext, targets: Sequence[Item], as_of: int | None) -> np.ndarray:
        """One row per target, in `spec.names` order."""
        now = now_of(as_of, self.clock)
        stats, genres = await asyncio.gather(
            self.history.item_stats([t.item_id for t in targets], as_of, now),
            self.genres.lookup(b.item_id for b in context.behaviours))
        user = summarize_history(context.behaviours, lambda i: genres.get(i, ()), self.spec, now)
        rows = [feature_vector(self.spec, user, stats[t.item_id], t, context.profile, now) for t in targets]
        return np.asarray(rows, dtype=np.float64).reshape(len(targets), len(self.spec.names))
