"""Offline features: the gateway's feature vectors (service/features.py) for every sample at its own time.

Per user, prefix sums over the timeline give the summary of the history a sample sees (the same
window the gateway reads: the newest HISTORY_CAP events strictly before the sample); per item,
sorted rating times give its statistics before the sample. Both reduce to the aggregates the
gateway computes from Redis, and one function turns either into the vector: a sample's offline and
online vectors are equal (tests/service/test_features.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from adapters.samples import HISTORY_CAP, Sample
from service.corating import neighbour_rows
from service.feature_vector import (
    ALL,
    BUCKETS,
    RECENT_S,
    FeatureSpec,
    ItemStats,
    UserSummary,
    bucket,
    candidate_rows,
    catalog_genres,
    genre_membership,
    last_ratings,
    user_vector,
    user_view,
)
from service.ingest import MovieLens
from service.records import Behaviour, Profile, Timeline

BLOCK = 20_000  # samples whose vectors are computed at once (no samples: one empty block, for the width)


class TimelineSums:
    """The offline path: prefix sums over one user's timeline, so the summary of any window
    timeline[start:end] costs O(genres) instead of O(window)."""

    def __init__(self, timeline: Sequence[Behaviour], genres_of: Callable[[str], Sequence[str]],
                 spec: FeatureSpec) -> None:
        self.columns = Timeline.of(timeline)  # what last_ratings and the neighbour features read
        rated = (~np.isnan(self.columns.ratings)).astype(np.int64)
        ratings = np.where(rated, self.columns.ratings, 0.0)
        likes = (ratings > 3).astype(np.int64) * rated
        membership = genre_membership(self.columns.item_ids, genres_of, spec) * rated[:, None]

        def cumulative(values: np.ndarray) -> np.ndarray:
            return np.concatenate([np.zeros((1, *values.shape[1:]), values.dtype), np.cumsum(values, axis=0)])

        self.ts = self.columns.ts.tolist()
        self.rated, self.total = cumulative(rated), cumulative(ratings)
        self.squares, self.liked = cumulative(ratings * ratings), cumulative(likes)
        self.genre_n = cumulative(membership)
        self.genre_sum = cumulative(membership * ratings[:, None])
        self.genre_liked = cumulative(membership * likes[:, None])

    def summary(self, start: int, end: int, now: int) -> UserSummary:
        n = int(self.rated[end] - self.rated[start])
        last, last_from = last_ratings(self.columns, start, end)
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
            lists = times.setdefault(b.item_id, [[] for _ in (*BUCKETS, ALL)])
            lists[BUCKETS.index(bucket(b.rating))].append(b.ts)
            lists[-1].append(b.ts)
        self.times = {item: [sorted(ts) for ts in lists] for item, lists in times.items()}

    def stats(self, item_id: str, before: int) -> ItemStats:
        lists = self.times.get(item_id)
        if lists is None:
            return ItemStats.empty()
        *buckets, every = lists
        total = bisect.bisect_left(every, before)
        return ItemStats(tuple(bisect.bisect_left(ts, before) for ts in buckets),
                         total - bisect.bisect_left(every, before - RECENT_S), every[0] if total else None)


class OfflineFeatures:
    """Feature vectors of samples of one dataset, built from its raw ratings."""

    def __init__(self, data: MovieLens, spec: FeatureSpec | None = None, cap: int = HISTORY_CAP) -> None:
        self.data = data
        self.spec = spec or FeatureSpec.of(data.items, data.profiles.values())
        self.cap = cap
        self.catalog = {i.item_id: i for i in data.items}
        self.genres_of = catalog_genres(self.catalog)
        self.items = ItemTimes(data.ratings)
        self._timelines: dict[int, TimelineSums] = {}  # by id of the shared timeline list

    def _sums(self, sample: Sample) -> TimelineSums:
        key = id(sample.timeline)
        if key not in self._timelines:
            self._timelines[key] = TimelineSums(sample.timeline, self.genres_of, self.spec)
        return self._timelines[key]

    def _summary(self, sample: Sample):
        return self._sums(sample).summary(*self._window(sample), sample.ts)

    def matrix(self, samples: Sequence[Sample], progress: str | None = None) -> np.ndarray:
        """(samples, features) in `spec.names` order."""
        blocks = []
        with tqdm(total=len(samples), desc=progress, disable=progress is None, unit="sample", mininterval=5) as bar:
            for start in range(0, max(len(samples), 1), BLOCK):  # a block's views at a time: bounded memory
                blocks.append(self._base_rows(samples[start:start + BLOCK]))
                bar.update(len(blocks[-1]))
        matrix = np.vstack(blocks)
        if self.spec.corating is not None:
            matrix = np.hstack([matrix, self._neighbours(samples)])
        return matrix.reshape(len(samples), len(self.spec.names))

    def _base_rows(self, samples: Sequence[Sample]) -> np.ndarray:
        """The vectors up to the neighbour features, each sample at its own time."""
        views = [user_view(self.spec, self._summary(s), self.data.profiles.get(s.user_id, Profile()), s.ts)
                 for s in samples]
        return candidate_rows(self.spec, views, [self.items.stats(s.item_id, s.ts) for s in samples],
                              [self.catalog[s.item_id] for s in samples])

    def _neighbours(self, samples: Sequence[Sample]) -> np.ndarray:
        """The table's neighbour features of each sample over its window, one similarity product per user's
        timeline."""
        out = np.zeros((len(samples), len(self.spec.corating.feature_names)))
        by_timeline: dict[int, list[int]] = {}
        for row, sample in enumerate(samples):
            by_timeline.setdefault(id(sample.timeline), []).append(row)
        for rows in by_timeline.values():
            first = samples[rows[0]]
            out[rows] = neighbour_rows(self.spec.corating, first.user_id, [samples[r].item_id for r in rows],
                                       self._sums(first).columns, [self._window(samples[r]) for r in rows])
        return out

    def _window(self, sample: Sample) -> tuple[int, int]:
        return max(0, sample.end - self.cap), sample.end

    def user_matrix(self, samples: Sequence[Sample]) -> np.ndarray:
        """The user side alone (`spec.user_names`), what RecLoRA's gate reads."""
        rows = [user_vector(self.spec, self._summary(s), self.data.profiles.get(s.user_id, Profile()), s.ts)
                for s in samples]
        return np.asarray(rows, dtype=np.float64).reshape(len(samples), len(self.spec.user_names))
