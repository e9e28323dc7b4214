"""What a feature vector is: the CRM's input for one (user, candidate) at a time, from exact aggregates.

The names and their order (`FeatureSpec.names`), the aggregates a history and an item reduce to
(`UserSummary`, `ItemStats`), and the one function that divides them into the vector
(`feature_vector`, or `user_view` + `candidate_vector` when one user's part serves many candidates).
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

    def totals(self, weights: np.ndarray) -> np.ndarray:
        """(weights, genres): each row of weights (one per behaviour) summed per genre. Integers and half stars
        are summed exactly in float64 in any order, so these equal the trainer's prefix sums."""
        per_set = np.stack([np.bincount(self.rows, w, minlength=len(self.table)) for w in weights])
        return per_set @ self.table


def summarize_timeline(timeline: Timeline, genres: GenreSets, now: int) -> UserSummary:
    """The online path: one request's history and its items' genres."""
    rated = ~np.isnan(timeline.ratings)
    values = np.where(rated, timeline.ratings, 0.0)
    genre_n, genre_sum, genre_liked = genres.totals(np.stack([rated, values, values > 3]).astype(np.float64))
    times, n = timeline.ts, int(rated.sum())
    last, last_from = last_ratings(timeline, 0, len(timeline))
    return UserSummary(n=n, clicks=len(timeline) - n, rating_sum=float(values.sum()),
                       rating_sq=float((values * values).sum()), liked=int((values > 3).sum()),
                       first_ts=int(times[0]) if len(times) else None, last_ts=int(times[-1]) if len(times) else None,
                       recent=len(times) - int(np.searchsorted(times, now - RECENT_S)),
                       last_ratings=last, last_ratings_from=last_from,
                       genre_n=tuple(int(v) for v in genre_n.tolist()), genre_sum=tuple(genre_sum.tolist()),
                       genre_liked=tuple(int(v) for v in genre_liked.tolist()))


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
    user, now = view.summary, view.now
    u_features, p_features = view.head[:len(USER_FEATURES)], view.head[len(USER_FEATURES):]
    u_mean = u_features[2]
    index = spec.genre_index()
    mine = sorted({index[g] for g in target.genres if g in index})
    g_means = [view.means[g] for g in mine]
    g_like = [(user.genre_liked[g] + GENRE_PRIOR_WEIGHT * PRIOR_LIKE) / (user.genre_n[g] + GENRE_PRIOR_WEIGHT)
              for g in mine]
    g_mean = _ratio(sum(g_means), len(g_means), u_mean)
    counts = item_stats.counts
    n = sum(counts[:5])
    total = sum(s * c for s, c in zip(STARS, counts))
    i_mean = (total + ITEM_PRIOR_WEIGHT * PRIOR_MEAN) / (n + ITEM_PRIOR_WEIGHT)
    raw_mean = _ratio(total, n, PRIOR_MEAN)
    i_var = _ratio(sum(s * s * c for s, c in zip(STARS, counts)), n, raw_mean * raw_mean) - raw_mean * raw_mean
    match = [_ratio(sum(user.genre_n[g] for g in mine), user.n * max(len(mine), 1), 0.0), g_mean,
             _ratio(sum(g_like), len(g_like), PRIOR_LIKE), g_mean - u_mean, max(g_means, default=u_mean),
             min(g_means, default=u_mean), u_mean - i_mean]
    item = [float(n), float(counts[5]), i_mean,
            (counts[3] + counts[4] + ITEM_PRIOR_WEIGHT * PRIOR_LIKE) / (n + ITEM_PRIOR_WEIGHT),
            math.sqrt(max(i_var, 0.0)), *(_ratio(c, n, 0.0) for c in counts[:5]), float(item_stats.recent),
            _days(now, item_stats.first_ts), float(target.year or -1),
            float(view.year - target.year) if target.year else -1.0, float(len(target.genres))]
    flags = [0.0] * len(spec.genres)
    for g in mine:
        flags[g] = 1.0
    return [*u_features, *match, *item, *p_features, *flags]


def feature_vector(spec: FeatureSpec, user: UserSummary, item_stats: ItemStats, target: Item, profile: Profile,
                   now: int) -> list[float]:
    """candidate_vector for one (user, candidate) at time `now`."""
    return candidate_vector(spec, user_view(spec, user, profile, now), item_stats, target)


def catalog_genres(catalog: Mapping[str, Item]) -> Callable[[str], Sequence[str]]:
    def genres_of(item_id: str) -> Sequence[str]:
        item = catalog.get(item_id)
        return item.genres if item is not None else ()
    return genres_of
