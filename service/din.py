"""DIN, the deep-interest CRM over a long ID history, and its user vector (what RecLoRA banks trained
before the feature-based CRM gate on).

DIN (Zhou et al., KDD 2018): the target item attends over the user's last 60
behaviours (item id + rating embeddings); the attention unit reads
[h, t, h - t, h * t]; the weighted sum (no softmax, as in DIN) joins the
target, user and profile embeddings in an MLP that outputs the CTR logit.
`user_vector` (user embedding + mean of the history embeddings) is what the
RecLoRA gate reads. The trainer (adapters/crm.py) fits it; the gateway loads
it to personalise adapters (stage 5, routing) for banks gated on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.ingest import MovieLens
from service.records import Behaviour, Profile

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
    dense: torch.Tensor | None = None  # (B, F) standardized point-in-time features (DINPlus)

    FIELDS = ("user", "profile", "target", "history", "ratings", "label", "dense")

    def rows(self, idx: torch.Tensor) -> Batch:
        return Batch(*(None if getattr(self, f) is None else getattr(self, f)[idx] for f in self.FIELDS))


Row = tuple[str, Profile | None, Sequence[Behaviour], str, int]  # user, profile, history, target, label


def encode_rows(rows: Sequence[Row], vocab: Vocab, length: int = LONG_HISTORY) -> Batch:
    """DIN's input: the last `length` behaviours of each history (ids and ratings), profile, target."""
    n = len(rows)
    history = np.zeros((n, length), np.int64)
    ratings = np.zeros((n, length), np.int64)
    profile = np.zeros((n, 3), np.int64)
    for row, (_, p, behaviours, _, _) in enumerate(rows):
        recent = list(behaviours[-length:])
        if recent:
            history[row, -len(recent):] = [vocab.items.get(b.item_id, 0) for b in recent]
            ratings[row, -len(recent):] = [int(round(b.rating or 0)) for b in recent]
        if p is not None:
            profile[row] = (vocab.genders.get(p.gender or "", 0), vocab.ages.get(p.age or "", 0),
                            vocab.occupations.get(p.occupation or "", 0))
    return Batch(user=torch.tensor([vocab.users.get(r[0], 0) for r in rows]),
                 profile=torch.from_numpy(profile),
                 target=torch.tensor([vocab.items.get(r[3], 0) for r in rows]),
                 history=torch.from_numpy(history), ratings=torch.from_numpy(ratings),
                 label=torch.tensor([float(r[4]) for r in rows]))


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


class DINPlus(DIN):
    """DIN with the side information the data has and the point-in-time features: every item is its id
    embedding plus its genres' and its release decade's (fixed per-item tables), and the standardized
    feature vector (features.py) joins the MLP beside the attention's interest vector."""

    def __init__(self, vocab: Vocab, item_genres: torch.Tensor, item_decades: torch.Tensor, n_dense: int,
                 dim: int = 32) -> None:
        super().__init__(vocab, dim)
        self.register_buffer("item_genres", item_genres.float())  # (items + 1, genres) multi-hot
        self.register_buffer("item_decades", item_decades.long())  # (items + 1,) 0 = unknown
        self.genre = nn.Linear(item_genres.shape[1], dim, bias=False)
        self.decade = nn.Embedding(int(item_decades.max()) + 1, dim)
        self.dense = nn.Sequential(nn.Linear(n_dense, 64), nn.PReLU())
        self.head = nn.Sequential(nn.Linear(3 * dim + 24 + 64, 128), nn.PReLU(), nn.Dropout(0.2),
                                  nn.Linear(128, 64), nn.PReLU(), nn.Linear(64, 1))

    def item_repr(self, ids: torch.Tensor) -> torch.Tensor:
        return self.item(ids) + self.genre(self.item_genres[ids]) + self.decade(self.item_decades[ids])

    def _history(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.item_repr(b.history) + self.rating(b.ratings), (b.history > 0).float()

    def forward(self, b: Batch) -> torch.Tensor:
        h, mask = self._history(b)
        target = self.item_repr(b.target)
        t = target.unsqueeze(1).expand_as(h)
        weights = self.attention(torch.cat([h, t, h - t, h * t], -1)).squeeze(-1) * mask
        interest = (weights.unsqueeze(-1) * h).sum(1)
        profile = torch.cat([self.gender(b.profile[:, 0]), self.age(b.profile[:, 1]),
                             self.occupation(b.profile[:, 2])], -1)
        return self.head(torch.cat([interest, target, self.user(b.user), profile, self.dense(b.dense)],
                                   -1)).squeeze(-1)


def item_tables(vocab: Vocab, items: Sequence, genres: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """DINPlus's per-item tables: genre multi-hot and release decade (1 + decades since 1900, 0 unknown)."""
    index = {g: i for i, g in enumerate(genres)}
    multi_hot = torch.zeros(len(vocab.items) + 1, len(genres))
    decades = torch.zeros(len(vocab.items) + 1, dtype=torch.long)
    for item in items:
        row = vocab.items.get(item.item_id)
        if row is None:
            continue
        for g in item.genres:
            if g in index:
                multi_hot[row, index[g]] = 1.0
        if item.year:
            decades[row] = 1 + max(0, min(item.year - 1900, 150)) // 10
    return multi_hot, decades


def save_crm(model: DIN, vocab: Vocab, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "vocab": asdict(vocab)}, path)


def load_crm(path: Path) -> tuple[DIN, Vocab]:
    saved = torch.load(path, weights_only=True)
    vocab = Vocab(**saved["vocab"])
    model = DIN(vocab)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), vocab
