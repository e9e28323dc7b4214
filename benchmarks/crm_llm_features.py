"""Laser's second role, measured: does the LLM's knowledge of items, as CRM features, lift the feature CRM?

The LLM's item vectors (what Qdrant indexes for SUBR: Gemma's mean-pooled hidden states of each item's
title, year and genres, PCA 512; service/encoder.py) turn into seven point-in-time features of a
(user, target) pair over the history the gateway reads (the newest HISTORY_CAP rated behaviours strictly
before the sample): the mean rating and liked share of the K history items nearest the target, their
similarity-weighted mean rating, the top similarity, the mean similarity to liked and to disliked items
and its gap. With `--item-dims D`, a third model reads instead the first D principal components of the
target's own LLM vector (Laser's item knowledge as dense features: what the text says about an item, which
a cold item's statistics cannot). LightGBM is fitted on the train split with and without them (the same
grid and early stopping as `lorec train gbdt`, over the shipped CRM's features, neighbours included, unless
`--no-neighbours`) and compared on validation only, overall and on cold items (fewer than 10 earlier
ratings). The test split is not read.

    .venv/bin/python benchmarks/crm_llm_features.py --data ../shared/data/ml-100k [--item-dims 16]
        -> benchmarks/results/crm_llm_features.json (one entry per dataset; --out another file)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine  # noqa: E402

from adapters.features import OfflineFeatures  # noqa: E402
from adapters.gbdt import feature_spec, fit_gbdt  # noqa: E402
from adapters.offline import Dataset  # noqa: E402
from adapters.samples import HISTORY_CAP, Sample  # noqa: E402
from adapters.train import metrics  # noqa: E402
from service.config import Settings  # noqa: E402
from service.corating import neighbour_block  # noqa: E402
from service.encoder import LLMEncoder  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "crm_llm_features.json"
SEMANTIC = ("s_knn_mean", "s_knn_like", "s_knn_wmean", "s_top_sim", "s_sim_liked", "s_sim_disliked", "s_sim_gap")
COLD_ITEM = 10  # earlier ratings of the target (issue 26's cold items)


def item_vectors(dataset: Dataset, model_dir: Path) -> dict[str, np.ndarray]:
    """Unit-length LLM vectors of the catalog, as ingestion computes them (a fresh PCA fit)."""
    with tempfile.TemporaryDirectory() as tmp:
        encoder = LLMEncoder(model_dir, Path(tmp) / "pca.npz")
        vectors = encoder.fit([item.description() for item in dataset.data.items])
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
    return {item.item_id: row for item, row in zip(dataset.data.items, unit)}


def semantic_features(samples: Sequence[Sample], vectors: dict[str, np.ndarray], k: int) -> np.ndarray:
    """(samples, SEMANTIC); NaN where the history has no rated behaviour (LightGBM's missing value)."""
    out = np.full((len(samples), len(SEMANTIC)), np.nan)
    by_timeline: dict[int, list[int]] = {}
    for row, sample in enumerate(samples):
        by_timeline.setdefault(id(sample.timeline), []).append(row)
    for rows in by_timeline.values():
        timeline = samples[rows[0]].timeline
        rated = np.array([b.rating is not None for b in timeline])
        ratings = np.array([b.rating or 0.0 for b in timeline])
        history = np.stack([vectors[b.item_id] for b in timeline])
        targets = np.stack([vectors[samples[r].item_id] for r in rows])
        similarity = targets @ history.T  # (samples of this user, timeline)
        for sims, row in zip(similarity, rows):
            end = samples[row].end
            window = slice(max(0, end - HISTORY_CAP), end)
            keep = rated[window]
            if keep.any():  # the CRM's neighbour features, over the LLM's similarity instead of co-rating
                out[row] = neighbour_block(sims[window][keep][None, :], ratings[window][keep], k)[0]
    return out


def item_components(samples: Sequence[Sample], vectors: dict[str, np.ndarray], dims: int) -> np.ndarray:
    """(samples, dims): the target's LLM vector in the PCA basis ingestion fitted, its leading components."""
    return np.stack([vectors[s.item_id][:dims] for s in samples])


def scored(fit, x_valid: np.ndarray, y_valid: np.ndarray, cold: np.ndarray) -> dict:
    scores = fit.booster.predict(x_valid, num_iteration=fit.booster.best_iteration)
    return {"valid": fit.validation, "valid_cold_items": metrics(y_valid[cold].tolist(), scores[cold]),
            "grid_auc": [round(point["auc"], 5) for point in fit.grid]}


def main(data: Path = typer.Option(..., help="a MovieLens folder"), k: int = typer.Option(10),
         out: Path = typer.Option(RESULTS), neighbours: bool = typer.Option(True),
         item_dims: int = typer.Option(0, help="also fit with the target's first D LLM components")) -> None:
    started = time.monotonic()
    dataset = Dataset.read(data)
    train, valid = dataset.parts["train"], dataset.parts["valid"]
    vectors = item_vectors(dataset, Settings().model_dir)
    s_train, s_valid = semantic_features(train, vectors, k), semantic_features(valid, vectors, k)
    features = OfflineFeatures(dataset.data, feature_spec(dataset, neighbours))
    names = list(features.spec.names)
    x_train, x_valid = features.matrix(train), features.matrix(valid)
    y_train = np.array([s.label for s in train])
    y_valid = np.array([s.label for s in valid])
    cold = x_valid[:, names.index("i_n")] < COLD_ITEM
    threads = os.cpu_count()
    base = fit_gbdt(names, x_train, y_train, x_valid, y_valid, threads=threads)

    def with_extra(extra: list[str], e_train: np.ndarray, e_valid: np.ndarray) -> tuple[dict, float, float]:
        """LightGBM over the CRM's features and these: its validation figures, its AUC gain over `base` and the
        share of the trees' gain these features take."""
        fit = fit_gbdt(names + extra, np.hstack([x_train, e_train]), y_train, np.hstack([x_valid, e_valid]),
                       y_valid, threads=threads)
        gain = dict(zip(names + extra, fit.booster.feature_importance("gain").tolist()))
        return (scored(fit, np.hstack([x_valid, e_valid]), y_valid, cold),
                round(fit.validation["auc"] - base.validation["auc"], 5),
                round(sum(gain[n] for n in extra) / sum(gain.values()), 4))

    with_llm, delta, llm_share = with_extra(list(SEMANTIC), s_train, s_valid)
    content = {}
    if item_dims:
        components = [item_components(part, vectors, item_dims) for part in (train, valid)]
        with_items, items_delta, _ = with_extra([f"c_{d}" for d in range(item_dims)], *components)
        content = {"crm_with_item_components": with_items, "delta_valid_auc_item_components": items_delta}
    report = {
        "dataset": dataset.name, "k": k, "n_train": len(train), "n_valid": len(valid),
        "n_valid_cold_items": int(cold.sum()), "crm": scored(base, x_valid, y_valid, cold),
        "crm_with_llm_features": with_llm, "llm_features_gain_share": llm_share,
        "delta_valid_auc": delta,
        "neighbours": neighbours, "item_dims": item_dims, **content,
        "seconds": round(time.monotonic() - started), "machine": machine(), "command": command(),
    }
    results = json.loads(out.read_text()) if out.exists() else {}
    results[dataset.name] = report
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({key: report[key] for key in ("dataset", "delta_valid_auc", "llm_features_gain_share")}
                     | {key: value for key, value in content.items() if key.startswith("delta")}))


if __name__ == "__main__":
    typer.run(main)
