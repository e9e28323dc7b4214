"""What a feature vector is: the CRM's input for one (user, candidate) at a time, from exact aggregates.

The names and their order (`FeatureSpec.names`), the aggregates a history and an item reduce to
(`UserSummary`, `ItemStats`), and the one function that divides them into the vector
(`feature_vector`, or `user_view` + `candidate_rows` when one user's part serves many candidates: one compiled
pass over them).
The gateway computes the aggregates from Redis (features.py), the trainer from prefix sums over the
raw files (adapters/features.py); both call these functions, so their vectors are bit-identical.
Sums of ratings are exact in float64 for star and half-star ratings, whatever the summation order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

import numba
import numpy as np

from service.corating import CoRating
from service.records import Item, Profile, Timeline

DAY_S = 86_400
RECENT_S = 30 * DAY_S  # "recent" activity: the 30 days before t
LAST = 10  # the user's last ratings
PRIOR_MEAN, PRIOR_LIKE = 3.5, 0.5  # smoothing targets of an item's mean rating and liked share
ITEM_PRIOR_WEIGHT = 10  # pseudo-ratings behind an item's smoothed statistics
GENRE_PRIOR_WEIGHT = 5  # pseudo-ratings (at the user's own mean) behind a user's genre statistics
STARS = (1, 2, 3, 4, 5)
BUCKETS = ("1", "2", "3", "4", "5", "click")  # an item's rating buckets (Redis: one sorted set each)
ALL = "all"  # and the set of all its ratings and clicks, for the recent count and the first time
GENDERS = {"male": 1.0, "female": 0.0}
_FIRST_NUMBER = re.compile(r"\d+")

USER_FEATURES = ("u_n", "u_clicks", "u_mean", "u_std", "u_like", "u_last_rating", "u_last10_mean",
                 "u_last10_like", "u_days_first", "u_days_last", "u_days_last10", "u_recent")
MATCH_FEATURES = ("ug_share", "ug_mean", "ug_like", "ug_dev", "ug_max", "ug_min", "ui_diff")
ITEM_FEATURES = ("i_n", "i_clicks", "i_mean", "i_like", "i_std", "i_share1", "i_share2", "i_share3", "i_share4",
                 "i_share5", "i_recent", "i_days_first", "i_year", "i_age", "i_ngenres")
PROFILE_FEATURES = ("p_gender", "p_age", "p_occupation")
CATEGORICAL = ("p_gender", "p_occupation")
_WIDTHS = (len(USER_FEATURES), len(MATCH_FEATURES), len(ITEM_FEATURES), len(PROFILE_FEATURES))  # for the kernel
_HEAD = len(USER_FEATURES) + len(PROFILE_FEATURES)  # a view's head: user_features


def star(rating: float) -> int:
    """The star bucket of a rating: nearest whole star (halves round up), clipped to 1..5."""
    return min(5, max(1, math.floor(rating + 0.5)))


def bucket(rating: float | None) -> str:
    return "click" if rating is None else str(star(rating))


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature vector means: the catalog's genres and the profiles' occupations, in a fixed order, and
    the co-rating table of the neighbour features where the CRM uses them (part of the CRM artifact, so the
    gateway builds the vectors the CRM was trained on)."""

    genres: tuple[str, ...]
    occupations: tuple[str, ...]
    corating: CoRating | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, items: Iterable[Item], profiles: Iterable[Profile]) -> FeatureSpec:
        return cls(genres=tuple(sorted({g for i in items for g in i.genres})),
                   occupations=tuple(sorted({p.occupation for p in profiles if p.occupation})))

    @property
    def names(self) -> tuple[str, ...]:
        return (*USER_FEATURES, *MATCH_FEATURES, *ITEM_FEATURES, *PROFILE_FEATURES,
                *(f"g_{g}" for g in self.genres), *(self.corating.feature_names if self.corating else ()))

    @property
    def user_names(self) -> tuple[str, ...]:
        """The user side alone (RecLoRA's gate reads it): user statistics, profile, genre affinities."""
        return (*USER_FEATURES, *PROFILE_FEATURES, *(f"ug_{g}" for g in self.genres))

    def genre_index(self) -> dict[str, int]:
        return self._genre_index

    @cached_property
    def _genre_index(self) -> dict[str, int]:  # once per spec: each candidate's vector looks it up
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
    how many of all of them fall in the RECENT_S before t, and the earliest one's time."""

    counts: tuple[int, ...]
    recent: int
    first_ts: int | None

    @classmethod
    def empty(cls) -> ItemStats:
        return cls((0,) * len(BUCKETS), 0, None)


def last_ratings(timeline: Timeline, start: int, end: int) -> tuple[tuple[float, ...], int | None]:
    """The last LAST ratings of timeline[start:end], oldest first, and the time of the oldest (the gateway's
    whole history and the trainer's windows alike)."""
    picked = start + np.flatnonzero(~np.isnan(timeline.ratings[start:end]))[-LAST:]
    return tuple(timeline.ratings[picked].tolist()), (int(timeline.ts[picked[0]]) if len(picked) else None)


def genre_membership(item_ids: Sequence[str], genres_of: Callable[[str], Sequence[str]], spec: FeatureSpec
                     ) -> np.ndarray:
    """(items, spec genres) 0/1: which of the spec's genres each item has."""
    index = spec.genre_index()
    out = np.zeros((len(item_ids), len(index)), dtype=np.int64)
    for row, item_id in enumerate(item_ids):
        for g in genres_of(item_id):
            if (gi := index.get(g)) is not None:
                out[row, gi] = 1
    return out


@dataclass(frozen=True)
class GenreSets:
    """Which of the spec's genres each behaviour's item has, factorised: each behaviour's genre set (`rows`)
    into the distinct sets' 0/1 rows (`table`). A few hundred sets serve a 2,000-event history, so the summary's
    sums run over the sets, not over a (behaviours, genres) matrix gathered per request."""

    rows: np.ndarray  # int64, one per behaviour
    table: np.ndarray  # (sets, spec genres) float64

    @classmethod
    def dense(cls, membership: np.ndarray) -> GenreSets:
        """Each behaviour its own set (genre_membership's matrix)."""
        return cls(np.arange(len(membership)), np.asarray(membership, dtype=np.float64))

    def membership(self) -> np.ndarray:
        return self.table[self.rows]


def summarize_timeline(timeline: Timeline, genres: GenreSets, now: int) -> UserSummary:
    """The online path: one request's history and its items' genres, in one compiled pass (~20 numpy calls
    cost ~0.35 ms of a 2,000-event request). Its sums are of whole and half stars, exact in any order, so they
    equal the trainer's prefix sums."""
    times = timeline.ts
    n, rating_sum, rating_sq, liked, last, totals = _summarize(timeline.ratings, genres.rows, genres.table, LAST)
    last_from = int(times[last[0]]) if len(last) else None
    genre_n, genre_sum, genre_liked = totals
    return UserSummary(n=n, clicks=len(timeline) - n, rating_sum=rating_sum, rating_sq=rating_sq, liked=liked,
                       first_ts=int(times[0]) if len(times) else None, last_ts=int(times[-1]) if len(times) else None,
                       recent=len(times) - int(np.searchsorted(times, now - RECENT_S)),
                       last_ratings=tuple(timeline.ratings[last].tolist()), last_ratings_from=last_from,
                       genre_n=tuple(int(v) for v in genre_n.tolist()), genre_sum=tuple(genre_sum.tolist()),
                       genre_liked=tuple(int(v) for v in genre_liked.tolist()))


@numba.njit(cache=True, nogil=True)
def _summarize(ratings: np.ndarray, rows: np.ndarray, table: np.ndarray, last: int
               ) -> tuple[int, float, float, int, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The rated count, the sum of ratings and of their squares, the liked count (> 3), the positions of the
    last `last` ratings (oldest first), and (rated, sum, liked) per genre: per genre set first, then spread
    over the sets' genres (the same values as over each behaviour's genres: whole and half stars sum exactly
    in any order)."""
    per_set = np.zeros((3, table.shape[0]))
    n, liked, rating_sum, rating_sq = 0, 0, 0.0, 0.0
    for i in range(len(ratings)):
        r = ratings[i]
        if r == r:  # not NaN: rated, not a click
            n += 1
            rating_sum += r
            rating_sq += r * r
            per_set[0, rows[i]] += 1.0
            per_set[1, rows[i]] += r
            if r > 3:
                liked += 1
                per_set[2, rows[i]] += 1.0
    picked = np.empty(min(last, n), dtype=np.int64)
    at = len(picked)
    i = len(ratings) - 1
    while at > 0:
        if ratings[i] == ratings[i]:
            at -= 1
            picked[at] = i
        i -= 1
    return n, rating_sum, rating_sq, liked, picked, per_set @ table


def _ratio(a: float, b: float, default: float) -> float:
    return a / b if b else default


def _days(now: int, then: int | None) -> float:
    return -1.0 if then is None else (now - then) / DAY_S


def _number(text: str | None) -> float:
    match = _FIRST_NUMBER.search(text or "")
    return float(match.group()) if match else -1.0


def user_features(spec: FeatureSpec, user: UserSummary, profile: Profile, now: int) -> list[float]:
    """USER_FEATURES then PROFILE_FEATURES."""
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


@dataclass(frozen=True, slots=True)
class UserView:
    """What every candidate's vector shares: computed once per request (or sample)."""

    summary: UserSummary
    head: list[float]  # user_features
    means: list[float]  # genre_means
    now: int
    year: int


def user_view(spec: FeatureSpec, user: UserSummary, profile: Profile, now: int) -> UserView:
    return UserView(user, user_features(spec, user, profile, now), genre_means(spec, user), now,
                    datetime.fromtimestamp(now, UTC).year)


def candidate_vector(spec: FeatureSpec, view: UserView, item_stats: ItemStats, target: Item) -> list[float]:
    """The CRM's input for one candidate, in `spec.names` order up to the neighbour features (corating.py
    adds those from the table and the history)."""
    return candidate_rows(spec, view, [item_stats], [target])[0].tolist()


def candidate_rows(spec: FeatureSpec, views: UserView | Sequence[UserView], item_stats: Sequence[ItemStats],
                   targets: Sequence[Item]) -> np.ndarray:
    """candidate_vector of each target (with its item_stats and its view, or one view for them all: a request's
    candidates), as (targets, features) float64, in one compiled pass (in Python, a request's 20 vectors cost
    ~0.5 ms; the trainer's samples each have their view)."""
    shared = isinstance(views, UserView)
    views = [views] if shared else views
    view_of = np.zeros(len(targets), dtype=np.int64) if shared else np.arange(len(targets), dtype=np.int64)
    index = spec.genre_index()
    flags = np.zeros((len(targets), len(spec.genres)), dtype=np.bool_)
    for row, target in enumerate(targets):
        for g in target.genres:
            if (gi := index.get(g)) is not None:
                flags[row, gi] = True
    return _candidate_rows(
        np.array([v.head for v in views], dtype=np.float64).reshape(len(views), _HEAD),
        np.array([v.means for v in views], dtype=np.float64).reshape(len(views), len(spec.genres)),
        np.array([v.summary.genre_n for v in views], dtype=np.int64).reshape(len(views), len(spec.genres)),
        np.array([v.summary.genre_liked for v in views], dtype=np.int64).reshape(len(views), len(spec.genres)),
        np.array([(v.summary.n, v.now, v.year) for v in views], dtype=np.int64).reshape(len(views), 3), view_of,
        np.array([(*s.counts, s.recent, -1 if s.first_ts is None else s.first_ts) for s in item_stats],
                 dtype=np.int64).reshape(len(item_stats), len(BUCKETS) + 2),
        np.array([(t.year or 0, len(t.genres)) for t in targets], dtype=np.int64).reshape(len(targets), 2), flags)


def compile_kernels() -> None:
    """Compile the summary's and candidate_rows' kernels now, not on a request (numba compiles on the first call,
    ~1 s each without its cache under __pycache__)."""
    one = np.zeros((1, 1), dtype=np.int64)
    _summarize(np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros((1, 1)), LAST)
    _candidate_rows(np.zeros((1, _HEAD)), np.zeros((1, 1)), one, one, np.zeros((1, 3), dtype=np.int64),
                    np.zeros(1, dtype=np.int64), np.zeros((1, len(BUCKETS) + 2), dtype=np.int64),
                    np.zeros((1, 2), dtype=np.int64), one.astype(np.bool_))


@numba.njit(cache=True, nogil=True)
def _candidate_rows(heads: np.ndarray, means: np.ndarray, genre_n: np.ndarray, genre_liked: np.ndarray,
                    users: np.ndarray, view_of: np.ndarray, stats: np.ndarray, static: np.ndarray, flags: np.ndarray
                    ) -> np.ndarray:  # pragma: no cover - compiled
    """Each row: the user's head, the match, the item, the profile, the genre flags. Every sum runs left to right
    over the genres in spec order, and every quotient divides the same two doubles, as Python's sum() and "/"
    would (tests/service/test_feature_vector.py holds it to the formulas in Python), so the trainer's vectors and the
    gateway's stay bit-identical. Per view: its head (user and profile features), genre means, genre counts and
    liked counts, and (rated count, now, now's year); per row: its view, its stats (BUCKETS counts, recent, first
    time or -1), its year (0: none) and genre count (spec or not), and its spec genres."""
    n_user, n_match, n_item, n_profile = _WIDTHS
    n_genres = means.shape[1]
    out = np.zeros((len(stats), n_user + n_match + n_item + n_profile + n_genres))
    for row in range(len(stats)):
        v = view_of[row]
        head = heads[v]
        user_n, now, year = users[v, 0], users[v, 1], users[v, 2]
        u_mean = head[2]
        out[row, :n_user] = head[:n_user]
        picked, genre_count, mean_sum, like_sum = 0, 0, 0.0, 0.0
        top, bottom = u_mean, u_mean
        for g in range(n_genres):
            if flags[row, g]:
                m = means[v, g]
                top = m if picked == 0 or m > top else top
                bottom = m if picked == 0 or m < bottom else bottom
                picked += 1
                genre_count += genre_n[v, g]
                mean_sum += m
                like_sum += (genre_liked[v, g] + GENRE_PRIOR_WEIGHT * PRIOR_LIKE) / (genre_n[v, g] + GENRE_PRIOR_WEIGHT)
        g_mean = mean_sum / picked if picked else u_mean
        counts = stats[row]
        n = counts[0] + counts[1] + counts[2] + counts[3] + counts[4]
        total = counts[0] + 2 * counts[1] + 3 * counts[2] + 4 * counts[3] + 5 * counts[4]
        squares = counts[0] + 4 * counts[1] + 9 * counts[2] + 16 * counts[3] + 25 * counts[4]
        i_mean = (total + ITEM_PRIOR_WEIGHT * PRIOR_MEAN) / (n + ITEM_PRIOR_WEIGHT)
        raw_mean = total / n if n else PRIOR_MEAN
        i_var = (squares / n if n else raw_mean * raw_mean) - raw_mean * raw_mean
        denominator = user_n * max(picked, 1)
        at = n_user
        out[row, at:at + n_match] = np.array((genre_count / denominator if denominator else 0.0, g_mean,
                                              like_sum / picked if picked else PRIOR_LIKE, g_mean - u_mean, top,
                                              bottom, u_mean - i_mean))
        at += n_match
        out[row, at:at + 5] = np.array((float(n), float(counts[5]), i_mean,
                                        (counts[3] + counts[4] + ITEM_PRIOR_WEIGHT * PRIOR_LIKE)
                                        / (n + ITEM_PRIOR_WEIGHT), math.sqrt(max(i_var, 0.0))))
        for s in range(5):
            out[row, at + 5 + s] = counts[s] / n if n else 0.0
        first, item_year = counts[7], static[row, 0]
        out[row, at + 10:at + n_item] = np.array((float(counts[6]), -1.0 if first < 0 else (now - first) / DAY_S,
                                                  float(item_year) if item_year else -1.0,
                                                  float(year - item_year) if item_year else -1.0,
                                                  float(static[row, 1])))
        at += n_item
        out[row, at:at + n_profile] = head[n_user:]
        at += n_profile
        for g in range(n_genres):
            out[row, at + g] = 1.0 if flags[row, g] else 0.0
    return out


def feature_vector(spec: FeatureSpec, user: UserSummary, item_stats: ItemStats, target: Item, profile: Profile,
                   now: int) -> list[float]:
    """candidate_vector for one (user, candidate) at time `now`."""
    return candidate_vector(spec, user_view(spec, user, profile, now), item_stats, target)


def catalog_genres(catalog: Mapping[str, Item]) -> Callable[[str], Sequence[str]]:
    def genres_of(item_id: str) -> Sequence[str]:
        item = catalog.get(item_id)
        return item.genres if item is not None else ()
    return genres_of
