"""Stage 3, the conventional recommender (CRM): a CTR logit per candidate from the point-in-time features.

The CRM is trained on the whole train split (Few2Many: it sees all the data, the LLM a few
thousand samples) and chosen on validation (`lorec train crm-gbdt`). It is the fallback scorer
when the engine fails, one side of the hybrid score (combine.py) and the source of the user
vector RecLoRA's gate reads.

An artifact is a folder `data_dir/crm/<name>/`: `manifest.json` (`CrmManifest`: the feature spec
it was trained on, data fingerprint, validation figures), the model file, here LightGBM's text
model, and the co-rating table of its neighbour features where it has them (corating.py). Its
version is the model file's content hash: a retrained CRM is another version, and a combiner fitted
on the old one is refused (combine.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel

from service.artifacts import ArtifactError, DataPaths, Manifest, sha256_of
from service.corating import CoRating
from service.feature_vector import FeatureSpec


class SpecModel(BaseModel):
    genres: list[str]
    occupations: list[str]

    def spec(self) -> FeatureSpec:
        return FeatureSpec(genres=tuple(self.genres), occupations=tuple(self.occupations))

    @classmethod
    def of(cls, spec: FeatureSpec) -> SpecModel:
        return cls(genres=list(spec.genres), occupations=list(spec.occupations))


class Standardizer(BaseModel):
    """Per-feature centre and scale (from train), for inputs that need them (RecLoRA's gate)."""

    center: list[float]
    scale: list[float]

    @classmethod
    def fit(cls, rows: np.ndarray) -> Standardizer:
        scale = rows.std(0)
        return cls(center=rows.mean(0).tolist(), scale=np.where(scale > 1e-9, scale, 1.0).tolist())

    def apply(self, rows: np.ndarray) -> np.ndarray:
        return (rows - np.asarray(self.center)) / np.asarray(self.scale)


class CrmManifest(Manifest):
    FORMAT = "lorec.crm"
    VERSION = 1

    name: str
    kind: Literal["gbdt"]
    dataset: str
    data_fingerprint: str
    spec: SpecModel
    feature_names: list[str]
    model_file: str
    model_sha256: str
    params: dict
    n_train: int
    validation: dict
    train_seconds: float
    users: Standardizer  # the user side of the features (spec.user_names), standardized for the gate
    corating_file: str | None = None  # the neighbour features' co-rating table (service/corating.py)
    corating_sha256: str | None = None
    command: str | None = None


def crm_dir(data_dir: Path, name: str) -> Path:
    return DataPaths(data_dir).crm(name)


class Crm:
    """A loaded CRM artifact: logits from feature rows, and standardized user vectors."""

    def __init__(self, folder: Path) -> None:
        import lightgbm

        self.folder = folder
        self.manifest = CrmManifest.load(folder)
        model = folder / self.manifest.model_file
        if not model.is_file() or sha256_of(model) != self.manifest.model_sha256:
            raise ArtifactError(f"{folder}: {self.manifest.model_file} is missing or not the file its manifest names")
        self.spec = replace(self.manifest.spec.spec(), corating=self._corating())
        if list(self.spec.names) != self.manifest.feature_names:
            raise ArtifactError(f"{folder}: trained on other features than this lorec computes "
                                f"({len(self.manifest.feature_names)} vs {len(self.spec.names)}): retrain it")
        self.booster = lightgbm.Booster(model_file=str(model))

    def _corating(self) -> CoRating | None:
        if self.manifest.corating_file is None:
            return None
        table = self.folder / self.manifest.corating_file
        if not table.is_file() or sha256_of(table) != self.manifest.corating_sha256:
            raise ArtifactError(f"{self.folder}: {self.manifest.corating_file} is missing or not the file its "
                                "manifest names")
        loaded = CoRating.load(table)
        loaded.compile_kernel()
        return loaded

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.model_sha256[:12]

    @property
    def ref(self) -> str:
        """`name@version`: how manifests name this CRM (an adapter's `offset_crm` and `prompt_crm`)."""
        return f"{self.name}@{self.version}"

    def logits(self, features: np.ndarray) -> np.ndarray:
        """One logit per feature row (rows in `spec.names` order)."""
        if len(features) == 0:
            return np.zeros(0)
        # One thread: the gateway's requests are small and the engine owns the cores.
        return np.asarray(self.booster.predict(features, raw_score=True, num_threads=1), dtype=np.float64)

    def user_vectors(self, users: np.ndarray) -> np.ndarray:
        """Rows of `spec.user_names` values, standardized as on train (the RecLoRA gate's input)."""
        return self.manifest.users.apply(users)


def open_crm(data_dir: Path, name: str | None) -> Crm | None:
    return Crm(crm_dir(data_dir, name)) if name else None
