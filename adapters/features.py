"""Offline features: the gateway's feature vectors (service/features.py) for every sample at its own time.

Per user, prefix sums over the timeline give the summary of the history a sample sees (the same
window the gateway reads: the newest HISTORY_CAP events strictly before the sample); per item,
sorted rating times give its statistics before the sample. Both reduce to the aggregates the
gateway computes from Redis, and one function turns either into the vector: a sample's offline and
online vectors are equal (tests/service/test_features.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from adapters.samples import HISTORY_CAP, Sample
from service.features import FeatureSpec, ItemTimes, TimelineSums, catalog_genres, feature_vector, user_vector
from service.ingest import MovieLens
from service.records import Profile


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
        return self._sums(sample).summary(max(0, sample.end - self.cap), sample.end, sample.ts)

    def matrix(self, samples: Sequence[Sample], progress: str | None = None) -> np.ndarray:
        """(samples, features) in `spec.names` order."""
        rows = [feature_vector(self.spec, self._summary(s), self.items.stats(s.item_id, s.ts),
                               self.catalog[s.item_id], self.data.profiles.get(s.user_id, Profile()), s.ts)
                for s in tqdm(samples, desc=progress, disable=progress is None, unit="sample", mininterval=5)]
        return np.asarray(rows, dtype=np.float64).reshape(len(samples), len(self.spec.names))

    def user_matrix(self, samples: Sequence[Sample]) -> np.ndarray:
        """The user side alone (`spec.user_names`), what RecLoRA's gate reads."""
        rows = [user_vector(self.spec, self._summary(s), self.data.profiles.get(s.user_id, Profile()), s.ts)
                for s in samples]
        return np.asarray(rows, dtype=np.float64).reshape(len(samples), len(self.spec.user_names))
