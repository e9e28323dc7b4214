"""Training the conventional recommender (CRM, DIN in service/crm.py) on the whole train split.

Samples, histories and splits are the ReLLa-protocol ones of `samples.py`; the
model and its input encoding are the gateway's own, so a saved CRM loads there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from adapters.features import OfflineFeatures
from adapters.offline import Dataset
from adapters.records import recorded_command
from adapters.samples import Sample, draw
from adapters.train import metrics
from service.config import Settings
from service.crm import Standardizer
from service.din import DIN, LONG_HISTORY, Batch, DINPlus, Vocab, encode_rows, item_tables, save_crm
from service.ingest import MovieLens

__all__ = ["LONG_HISTORY", "DIN", "Vocab", "encode", "predict", "train_din"]


def encode(samples: Sequence[Sample], data: MovieLens, vocab: Vocab, length: int = LONG_HISTORY) -> Batch:
    """Samples as DIN rows: the history is every rating before the sample (strictly earlier)."""
    return encode_rows([(s.user_id, data.profiles.get(s.user_id), s.history(length), s.item_id, s.label)
                        for s in samples], vocab, length)


def _rows(batch: Batch, idx: torch.Tensor) -> Batch:
    return batch.rows(idx)


@torch.no_grad()
def predict(model: DIN, batch: Batch, batch_size: int = 4096) -> np.ndarray:
    model.eval()
    n = len(batch.label)
    return np.concatenate([torch.sigmoid(model(_rows(batch, torch.arange(i, min(i + batch_size, n))))).numpy()
                           for i in range(0, n, batch_size)])


def train_din(train: Batch, valid: Batch, vocab: Vocab, epochs: int = 5, batch_size: int = 1024,
              lr: float = 1e-3, seed: int = 0, patience: int = 2, model: DIN | None = None) -> tuple[DIN, dict]:
    """Adam on BCE; the epoch with the best validation AUC is kept (early stopping on valid). `model`: a
    DIN variant to train (DINPlus), built under the same seed."""
    torch.manual_seed(seed)
    model = model if model is not None else DIN(vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, stale, history = None, None, 0, []
    started = time.monotonic()
    steps = math.ceil(len(train.label) / batch_size)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train.label), generator=torch.Generator().manual_seed(seed + epoch))
        progress = tqdm(range(steps), desc=f"crm epoch {epoch + 1}", unit="step")
        for step in progress:
            b = _rows(train, order[step * batch_size:(step + 1) * batch_size])
            loss = nn.functional.binary_cross_entropy_with_logits(model(b), b.label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
        result = metrics(valid.label.int().tolist(), predict(model, valid))
        history.append({"epoch": epoch + 1, **result})
        if best is None or result["auc"] > best["auc"]:
            best, stale = {"epoch": epoch + 1, **result}, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state)
    return model, {"valid": best, "epochs": history, "train_seconds": time.monotonic() - started}


def _din_plus(data: MovieLens, vocab: Vocab, parts: dict, sliced: Sequence[Sample], batches: dict) -> DINPlus:
    """DINPlus and its dense inputs: the point-in-time features, standardized on train."""
    features = OfflineFeatures(data)
    matrices = {name: features.matrix(samples, progress=f"{name} features") for name, samples in parts.items()}
    matrices["slice"] = features.matrix(sliced)
    scale = Standardizer.fit(matrices["train"])
    for name, matrix in matrices.items():
        batches[name].dense = torch.tensor(scale.apply(matrix), dtype=torch.float32)
    genres, decades = item_tables(vocab, data.items, features.spec.genres)
    torch.manual_seed(0)
    return DINPlus(vocab, genres, decades, matrices["train"].shape[1])


def train_din_from_folder(settings: Settings, directory: Path, epochs: int, seed: int, eval_n: int, eval_seed: int,
                          side_info: bool) -> tuple[str, str, dict]:
    """`lorec train crm`: the DIN (or DINPlus) on the whole train split, tested once at the end on the whole
    test split and on the LLM rows' seeded slice; the DIN is saved for RecLoRA banks gated on it.
    Returns the dataset, the method name its figures are recorded under, and the figures."""
    dataset = Dataset.read(directory)
    data, parts = dataset.data, dataset.parts
    vocab = Vocab.of(data)
    batches = {name: encode(samples, data, vocab) for name, samples in parts.items()}
    sliced = draw(parts["test"], eval_n, eval_seed)
    batches["slice"] = encode(sliced, data, vocab)
    model = _din_plus(data, vocab, parts, sliced, batches) if side_info else None
    model, report = train_din(batches["train"], batches["valid"], vocab, epochs=epochs, seed=seed, model=model)
    test_full = metrics([s.label for s in parts["test"]], predict(model, batches["test"]))
    test_slice = metrics([s.label for s in sliced], predict(model, batches["slice"]))
    if not side_info:
        save_crm(model, vocab, settings.paths.crm(f"{dataset.name}-din.pt"))
    result = {**test_slice, "n_test": len(sliced), "n_train": len(parts["train"]), "kind": "crm",
              "test_full": test_full, "valid": report["valid"], "train_seconds": round(report["train_seconds"], 1),
              "seed": eval_seed, "command": recorded_command()}
    return dataset.name, "crm-din-plus" if side_info else "crm-din", result
