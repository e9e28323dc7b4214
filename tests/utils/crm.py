"""A real feature CRM (LightGBM over the point-in-time features) trained in seconds on an ML-100K slice."""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np

from adapters.features import OfflineFeatures
from adapters.gbdt import fit_gbdt, save_gbdt
from adapters.samples import build_samples, split_by_time
from service.corating import CoRating
from service.crm import crm_dir
from service.feature_vector import FeatureSpec
from service.ingest import read_movielens


@cache
def _fitted(ml100k: Path, n_train: int):
    data = read_movielens(ml100k)
    parts = split_by_time(build_samples(data))
    spec = FeatureSpec.of(data.items, data.profiles.values())  # with the neighbour features, as trained
    table = CoRating.fit(data.ratings, parts["valid"][0].ts, taste=True)
    features = OfflineFeatures(data, replace(spec, corating=table))
    train, valid = parts["train"][-n_train:], parts["valid"][:2000]
    fit = fit_gbdt(features.spec.names, features.matrix(train), np.array([s.label for s in train]),
                   features.matrix(valid), np.array([s.label for s in valid]),
                   grid=({"num_leaves": 15, "min_child_samples": 50},), rounds=200, patience=30, threads=1)
    return data, features, fit, features.user_matrix(train), len(train)


def build_crm(data_dir: Path, ml100k: Path, name: str = "test-gbdt", n_train: int = 8000) -> Path:
    """Writes the CRM artifact `data_dir/crm/name` (once per process and slice) and returns its folder."""
    data, features, fit, users, n = _fitted(ml100k, n_train)
    folder = crm_dir(data_dir, name)
    if not folder.exists():
        save_gbdt(fit, folder, name=name, dataset="ml-100k", data_fingerprint=data.fingerprint,
                  spec=features.spec, n_train=n, user_rows=users, command=None)
    return folder
