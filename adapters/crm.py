"""The conventional recommender (CRM): DIN, trained on the whole train split with IDs and a long history.

DIN (Zhou et al., KDD 2018): the target item attends over the user's last 60
behaviours (item id + rating embeddings); the attention unit reads
[h, t, h - t, h * t]; the weighted sum (no softmax, as in DIN) joins the
target, user and profile embeddings in an MLP that outputs the CTR logit.
Samples, histories and splits are the ReLLa-protocol ones of `samples.py`.
`user_vector` (user embedding + mean of the history embeddings) is what the
RecLoRA gate reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from adapters.samples import Sample
from adapters.train import metrics
from service.ingest import MovieLens

LONG_HISTORY = 60


@dataclass
class Vocab:
    users: dict[str, int]
    items: dict[str, int]
    genders: dict[str, int]
    ages: dict[str, int]
    occupations: dict[str, int]

    @classmethod
    def of(cls, data: MovieLens) -> Vocab:
        def index(values) -> dict[str, int]:  # 0 is padding / unknown
            return {v: i + 1 for i, v in enumerate(sorted(set(values)))}

        profiles = data.profiles.values()
        return cls(index(u for u, _ in data.ratings), index(i.item_id for i in data.items),
                   index(p.gender or "" for p in profiles), index(p.age or "" for p in profiles),
                   index(p.occupation or "" for p in profiles))


@dataclass
class Batch:
    user: torch.Tensor
    profile: torch.Tensor  # (B, 3): gender, age, occupation
    target: torch.Tensor
    history: torch.Tensor  # (B, L) item ids, 0 = padding
    ratings: torch.Tensor  # (B, L) 0..5 (0 = padding or click)
    label: torch.Tensor


def encode(samples: Sequence[Sample], data: MovieLens, vocab: Vocab, length: int = LONG_HISTORY) -> Batch:
    n = len(samples)
    history = np.zeros((n, length), np.int64)
    ratings = np.zeros((n, length), np.int64)
    profile = np.zeros((n, 3), np.int64)
    for row, s in enumerate(samples):
        recent = s.history(length)
        if recent:
            history[row, -len(recent):] = [vocab.items.get(b.item_id, 0) for b in recent]
            ratings[row, -len(recent):] = [int(round(b.rating or 0)) for b in recent]
        p = data.profiles.get(s.user_id)
        if p is not None:
            profile[row] = (vocab.genders.get(p.gender or "", 0), vocab.ages.get(p.age or "", 0),
                            vocab.occupations.get(p.occupation or "", 0))
    return Batch(user=torch.tensor([vocab.users.get(s.user_id, 0) for s in samples]),
                 profile=torch.from_numpy(profile),
                 target=torch.tensor([vocab.items.get(s.item_id, 0) for s in samples]),
                 history=torch.from_numpy(history), ratings=torch.from_numpy(ratings),
                 label=torch.tensor([float(s.label) for s in samples]))


def _rows(batch: Batch, idx: torch.Tensor) -> Batch:
    return Batch(*(getattr(batch, f)[idx] for f in ("user", "profile", "target", "history", "ratings", "label")))


class DIN(nn.Module):
    def __init__(self, vocab: Vocab, dim: int = 32) -> None:
        super().__init__()
        self.item = nn.Embedding(len(vocab.items) + 1, dim, padding_idx=0)
        self.rating = nn.Embedding(6, dim, padding_idx=0)
        self.user = nn.Embedding(len(vocab.users) + 1, dim, padding_idx=0)
        self.gender = nn.Embedding(len(vocab.genders) + 1, 8)
        self.age = nn.Embedding(len(vocab.ages) + 1, 8)
        self.occupation = nn.Embedding(len(vocab.occupations) + 1, 8)
        self.attention = nn.Sequential(nn.Linear(4 * dim, 64), nn.PReLU(), nn.Linear(64, 1))
        self.head = nn.Sequential(nn.Linear(3 * dim + 24, 128), nn.PReLU(), nn.Dropout(0.2),
                                  nn.Linear(128, 64), nn.PReLU(), nn.Linear(64, 1))

    def _history(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.item(b.history) + self.rating(b.ratings), (b.history > 0).float()

    def forward(self, b: Batch) -> torch.Tensor:
        h, mask = self._history(b)
        t = self.item(b.target).unsqueeze(1).expand_as(h)
        weights = self.attention(torch.cat([h, t, h - t, h * t], -1)).squeeze(-1) * mask
        interest = (weights.unsqueeze(-1) * h).sum(1)
        profile = torch.cat([self.gender(b.profile[:, 0]), self.age(b.profile[:, 1]),
                             self.occupation(b.profile[:, 2])], -1)
        return self.head(torch.cat([interest, self.item(b.target), self.user(b.user), profile], -1)).squeeze(-1)

    @torch.no_grad()
    def user_vector(self, b: Batch) -> torch.Tensor:
        """What the RecLoRA gate reads: user embedding and mean history embedding."""
        h, mask = self._history(b)
        mean = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return torch.cat([self.user(b.user), mean], -1)


@torch.no_grad()
def predict(model: DIN, batch: Batch, batch_size: int = 4096) -> np.ndarray:
    model.eval()
    n = len(batch.label)
    return np.concatenate([torch.sigmoid(model(_rows(batch, torch.arange(i, min(i + batch_size, n))))).numpy()
                           for i in range(0, n, batch_size)])


def train_din(train: Batch, valid: Batch, vocab: Vocab, epochs: int = 5, batch_size: int = 1024,
              lr: float = 1e-3, seed: int = 0, patience: int = 2) -> tuple[DIN, dict]:
    """Adam on BCE; the epoch with the best validation AUC is kept (early stopping on valid)."""
    torch.manual_seed(seed)
    model = DIN(vocab)
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
