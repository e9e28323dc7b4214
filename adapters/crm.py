"""Training the conventional recommender (CRM, DIN in service/crm.py) on the whole train split.

Samples, histories and splits are the ReLLa-protocol ones of `samples.py`; the
model and its input encoding are the gateway's own, so a saved CRM loads there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from adapters.samples import Sample
from adapters.train import metrics
from service.din import DIN, LONG_HISTORY, Batch, Vocab, encode_rows
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
