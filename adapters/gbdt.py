"""The feature CRM: LightGBM over the point-in-time features, trained on the whole train split.

Every sample of train (ReLLa protocol) is a row of `adapters/features.py`'s matrix. A small grid of
tree settings is fitted with early stopping on validation AUC; the best on validation is saved as a
CRM artifact (service/crm.py). The test split is not read here: `lorec eval` scores it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from adapters.features import OfflineFeatures
from adapters.offline import Dataset
from adapters.records import recorded_command
from adapters.train import metrics
from service.artifacts import sha256_of
from service.corating import CoRating
from service.crm import CrmManifest, SpecModel, Standardizer, crm_dir
from service.feature_vector import CATEGORICAL, FeatureSpec

MODEL_FILE = "model.txt"
CORATING_FILE = "corating.npz"
# What the grid varies; everything else is fixed below. Small on purpose: validation picks among them.
GRID = ({"num_leaves": 15, "min_child_samples": 50}, {"num_leaves": 31, "min_child_samples": 100},
        {"num_leaves": 63, "min_child_samples": 200})
BASE_PARAMS = {"objective": "binary", "learning_rate": 0.03, "subsample": 0.8, "subsample_freq": 1,
               "colsample_bytree": 0.8, "reg_lambda": 1.0, "verbose": -1, "seed": 0, "deterministic": True,
               "force_row_wise": True}


@dataclass
class GbdtFit:
    booster: object
    params: dict
    validation: dict
    grid: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def fit_gbdt(names: Sequence[str], x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
             y_valid: np.ndarray, grid: Sequence[dict] = GRID, rounds: int = 4000, patience: int = 200,
             threads: int | None = None) -> GbdtFit:
    """Each grid point with early stopping on validation AUC; the best on validation wins."""
    import lightgbm

    started = time.monotonic()
    categorical = [n for n in CATEGORICAL if n in names]
    train = lightgbm.Dataset(x_train, y_train, feature_name=list(names), categorical_feature=categorical,
                             free_raw_data=False)
    valid = lightgbm.Dataset(x_valid, y_valid, reference=train)
    best: GbdtFit | None = None
    tried = []
    for point in grid:
        params = {**BASE_PARAMS, **point, "metric": "auc", **({"num_threads": threads} if threads else {})}
        booster = lightgbm.train(params, train, num_boost_round=rounds, valid_sets=[valid],
                                 callbacks=[lightgbm.early_stopping(patience, verbose=False)])
        scores = booster.predict(x_valid, num_iteration=booster.best_iteration)
        result = {**metrics(y_valid.tolist(), scores), "best_iteration": booster.best_iteration}
        tried.append({**point, **result})
        if best is None or result["auc"] > best.validation["auc"]:
            best = GbdtFit(booster, {**params, "num_boost_round": booster.best_iteration}, result)
    assert best is not None
    best.grid, best.seconds = tried, time.monotonic() - started
    return best


def save_gbdt(fit: GbdtFit, folder: Path, *, name: str, dataset: str, data_fingerprint: str, spec: FeatureSpec,
              n_train: int, user_rows: np.ndarray, command: str | None) -> CrmManifest:
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / MODEL_FILE
    fit.booster.save_model(str(model), num_iteration=fit.params["num_boost_round"])
    table = None
    if spec.corating is not None:
        table = folder / CORATING_FILE
        spec.corating.save(table)
    manifest = CrmManifest.new(
        name=name, kind="gbdt", dataset=dataset, data_fingerprint=data_fingerprint, spec=SpecModel.of(spec),
        feature_names=list(spec.names), model_file=MODEL_FILE, model_sha256=sha256_of(model),
        params=fit.params, n_train=n_train, validation={**fit.validation, "grid": fit.grid},
        train_seconds=round(fit.seconds, 1), users=Standardizer.fit(user_rows),
        corating_file=table.name if table else None, corating_sha256=sha256_of(table) if table else None,
        command=command)
    manifest.save(folder)
    return manifest


def feature_spec(dataset: Dataset, neighbours: bool, taste: bool = True) -> FeatureSpec:
    """The CRM's features; with `neighbours`, a co-rating table of every rating before the first validation
    sample (so validation and test see only their past), holding the ratings too with `taste`."""
    spec = FeatureSpec.of(dataset.data.items, dataset.data.profiles.values())
    if not neighbours:
        return spec
    cutoff = min(sample.ts for sample in dataset.parts["valid"])
    return replace(spec, corating=CoRating.fit(dataset.data.ratings, cutoff, taste=taste))


def train_from_folder(directory: Path, data_dir: Path, name: str | None, threads: int | None = None,
                      neighbours: bool = True, taste: bool = True) -> tuple[Path, CrmManifest]:
    """`lorec train gbdt`: samples and features of a MovieLens folder, the grid, the artifact."""
    dataset = Dataset.read(directory)
    parts = dataset.parts
    features = OfflineFeatures(dataset.data, feature_spec(dataset, neighbours, taste))
    x_train = features.matrix(parts["train"], progress="train features")
    x_valid = features.matrix(parts["valid"], progress="valid features")
    fit = fit_gbdt(features.spec.names, x_train, np.array([s.label for s in parts["train"]]),
                   x_valid, np.array([s.label for s in parts["valid"]]), threads=threads)
    staging = crm_dir(data_dir, f".staging-{dataset.name}")
    shutil.rmtree(staging, ignore_errors=True)
    manifest = save_gbdt(fit, staging, name=name or "", dataset=dataset.name,
                         data_fingerprint=dataset.data.fingerprint, spec=features.spec, n_train=len(parts["train"]),
                         user_rows=features.user_matrix(parts["train"]), command=recorded_command())
    if not name:  # the default name carries the model's hash: a retrained CRM is a new artifact
        manifest = manifest.model_copy(update={"name": f"gbdt-{dataset.name}-{manifest.model_sha256[:8]}"})
        manifest.save(staging)
    return publish(staging, crm_dir(data_dir, manifest.name)), manifest


def publish(staging: Path, folder: Path) -> Path:
    """Move a trained CRM into place; an existing one is never overwritten (clients pin it by name), and the
    refused copy does not stay behind."""
    if folder.exists():
        shutil.rmtree(staging)
        raise FileExistsError(f"CRM {folder.name!r} exists in {folder.parent} (the same model, or a name "
                              "given twice): remove it or pass another --name")
    staging.rename(folder)
    return folder


def out_of_fold_logits(params: dict, names: Sequence[str], x_train: np.ndarray, y_train: np.ndarray,
                       wanted: Sequence[int], folds: int = 5, seed: int = 0, threads: int | None = None
                       ) -> np.ndarray:
    """Logits for the train rows `wanted` from models that did not see them: the CRM's settings refitted
    on the other folds of train. The CRM itself saw every train row, so its own logits there are
    optimistic; what an LLM learns on top of them (residual training) must see honest ones."""
    import lightgbm

    fold_of = np.random.default_rng(seed).integers(0, folds, len(x_train))
    wanted = np.asarray(wanted)
    out = np.zeros(len(wanted))
    rounds = params["num_boost_round"]
    fit_params = {k: v for k, v in params.items() if k not in ("num_boost_round", "metric")}
    if threads:
        fit_params["num_threads"] = threads
    categorical = [n for n in CATEGORICAL if n in names]
    for fold in range(folds):
        held = fold_of[wanted] == fold
        if not held.any():
            continue
        keep = fold_of != fold
        data = lightgbm.Dataset(x_train[keep], y_train[keep], feature_name=list(names),
                                categorical_feature=categorical)
        booster = lightgbm.train(fit_params, data, num_boost_round=rounds)
        out[held] = booster.predict(x_train[wanted[held]], raw_score=True)
    return out
