"""Item neighbourhoods for the CRM: which items the same people rated, and how this user rated those nearest
the candidate (the collaborative half of item-based CF, as features).

A `CoRating` table is the 0/1 "has rated" matrix (items x users) of every rating before a cutoff: the
trainer fits it on the train split (every rating before the first validation sample) and it ships inside
the CRM artifact. Two items' similarity is the cosine of their rows with the requesting user's own column
left out, so it counts other people only: a training sample's own rating, which lies before the cutoff,
never shows in its features, and a request sees what a training sample of the same user saw. The table
holds who rated what, never how; it is fixed at the cutoff, so every request from the cutoff on (validation,
test, live traffic) sees only ratings before its `as_of`, and it learns nothing from later events until the
CRM is retrained.

The features of a candidate, over the rated behaviours of the history the request reads: the mean rating and
liked share of the K most similar, their similarity-weighted mean rating, the top similarity, the mean
similarity to liked and to disliked items and its gap. Missing (NaN, LightGBM's missing value) where the
history has no rating or nobody else rated the candidate. Counts are integers and every similarity is one
division, so a similarity does not depend on which other items share the batch: the gateway's vectors equal
the trainer's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from pathlib import Path

import numpy as np
from scipy import sparse

from service.records import Behaviour

NEIGHBOUR_FEATURES = ("n_knn_mean", "n_knn_like", "n_knn_wmean", "n_top_sim", "n_sim_liked", "n_sim_disliked",
                      "n_sim_gap")
K_NEAREST = 10
DENSE_ITEMS = 8192  # up to this many items a table keeps every pair's count (8192: 256 MB)


class CoRating:
    """Who rated which item before `cutoff`, and item similarities from it."""

    def __init__(self, items: Sequence[str], users: Sequence[str], rated: sparse.csr_matrix, cutoff: int,
                 dense_items: int = DENSE_ITEMS) -> None:
        self.items, self.users, self.cutoff = list(items), list(users), cutoff
        self.row_of = {item_id: n for n, item_id in enumerate(self.items)}
        self.column_of = {user_id: n for n, user_id in enumerate(self.users)}
        self.rated = rated.astype(np.float64).tocsr()  # counts stay exact integers in float64
        self.rated_t = self.rated.T.tocsr()  # users x items: one user's column is one row here
        self.raters = np.asarray(self.rated.sum(axis=1)).ravel()
        # Every pair's count, when the catalog is small enough: a request then gathers its counts instead of
        # multiplying its candidates' rows (10x faster on ML-1M). float32 holds counts below 2^24 exactly.
        self.pair_counts = ((self.rated @ self.rated.T).toarray().astype(np.float32)
                            if len(self.items) <= dense_items else None)

    @classmethod
    def fit(cls, ratings: Iterable[tuple[str, Behaviour]], cutoff: int) -> CoRating:
        pairs = sorted({(user_id, b.item_id) for user_id, b in ratings if b.ts < cutoff and b.rating is not None})
        items = sorted({item_id for _, item_id in pairs})
        users = sorted({user_id for user_id, _ in pairs})
        row_of = {item_id: n for n, item_id in enumerate(items)}
        column_of = {user_id: n for n, user_id in enumerate(users)}
        rows = [row_of[item_id] for _, item_id in pairs]
        columns = [column_of[user_id] for user_id, _ in pairs]
        rated = sparse.csr_matrix((np.ones(len(pairs)), (rows, columns)), shape=(len(items), len(users)))
        return cls(items, users, rated, cutoff)

    def save(self, path: Path) -> None:
        rated = self.rated.tocsr()
        np.savez_compressed(path, items=np.array(self.items), users=np.array(self.users), cutoff=self.cutoff,
                            indptr=rated.indptr, indices=rated.indices.astype(np.int32))

    @classmethod
    def load(cls, path: Path) -> CoRating:
        with np.load(path, allow_pickle=False) as f:
            items, users = f["items"].tolist(), f["users"].tolist()
            indices = f["indices"]
            rated = sparse.csr_matrix((np.ones(len(indices)), indices, f["indptr"]), shape=(len(items), len(users)))
            return cls(items, users, rated, int(f["cutoff"]))

    @classmethod
    def without_pair_counts(cls, table: CoRating) -> CoRating:
        """The same table computing each request's counts from the sparse rows (a catalog too large for
        the pair counts)."""
        return cls(table.items, table.users, table.rated, table.cutoff, dense_items=0)

    def similarity(self, user_id: str, targets: Sequence[str], history: Sequence[str]) -> np.ndarray:
        """(targets, history) cosine of the items' rows without `user_id`'s column; 0 for an unknown item."""
        t_rows, t_known = self._rows(targets)
        h_rows, h_known = self._rows(history)
        mine = self._own(user_id)
        if self.pair_counts is not None:
            counts = self.pair_counts[np.ix_(t_rows, h_rows)].astype(np.float64)
        else:  # cost grows with the candidates' raters
            counts = (self.rated[t_rows] @ self.rated_t).toarray()[:, h_rows]
        counts -= np.outer(mine[t_rows], mine[h_rows])
        norms = np.sqrt(np.outer((self.raters[t_rows] - mine[t_rows]) * t_known,
                                 (self.raters[h_rows] - mine[h_rows]) * h_known))
        return np.divide(counts, norms, out=np.zeros_like(counts), where=norms > 0)

    def other_raters(self, user_id: str, targets: Sequence[str]) -> np.ndarray:
        """How many people but the user rated each target before the cutoff (none: its features are missing)."""
        rows, known = self._rows(targets)
        return (self.raters[rows] - self._own(user_id)[rows]) * known

    def _own(self, user_id: str) -> np.ndarray:
        """1.0 at the items the user rated before the cutoff (all 0 for someone the table does not know)."""
        mine = np.zeros(len(self.items))
        column = self.column_of.get(user_id)
        if column is not None:
            mine[self.rated_t[column].indices] = 1.0
        return mine

    def _rows(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = positions(self.row_of, item_ids)
        return np.maximum(rows, 0), (rows >= 0).astype(np.float64)


def positions(index: Mapping[str, int], keys: Sequence[str]) -> np.ndarray:
    """Each key's position in `index`, -1 where it has none (one C-level pass: a request looks up its whole
    history)."""
    return np.fromiter(map(index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))


def neighbour_block(similarity: np.ndarray, ratings: np.ndarray, k: int = K_NEAREST) -> np.ndarray:
    """(targets, NEIGHBOUR_FEATURES) from each target's similarity (a row) to the same rated history items
    (columns, time order) and their ratings. A row's numbers do not depend on the rows batched with it (a
    request's 20 candidates, or one training sample): sums of floats run one row at a time, because numpy
    may sum the rows of a 2-D array in another order than a single row."""
    targets, n = similarity.shape
    if n == 0:
        return np.full((targets, len(NEIGHBOUR_FEATURES)), np.nan)
    top = nearest(similarity, k)
    top_similarity, top_ratings = np.take_along_axis(similarity, top, axis=1), ratings[top]
    weights = np.maximum(top_similarity, 0) + 1e-6
    weighted = [(w * r).sum() / w.sum() for w, r in zip(weights, top_ratings)]
    liked = ratings > 3
    missing = np.full(targets, np.nan)
    to_liked = np.array([row.mean() for row in similarity[:, liked]]) if liked.any() else missing
    to_disliked = np.array([row.mean() for row in similarity[:, ~liked]]) if (~liked).any() else missing
    return np.column_stack([top_ratings.mean(axis=1), liked[top].mean(axis=1),  # exact: halves and counts
                            weighted, top_similarity[:, 0], to_liked, to_disliked,
                            np.nan_to_num(to_liked) - np.nan_to_num(to_disliked)])


def nearest(similarity: np.ndarray, k: int) -> np.ndarray:
    """Per row, `np.argsort(-row, kind="stable")[:k]` (ties: the earlier behaviour first), sorting only the
    entries that reach the row's k-th largest value (a few, against a history of thousands)."""
    n_rows, n = similarity.shape
    if n <= k:
        return np.argsort(-similarity, axis=1, kind="stable")
    kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1:k]
    rows, columns = np.nonzero(similarity >= kth)  # row-major: within a row, earlier behaviours first
    order = np.lexsort((columns, -similarity[rows, columns], rows))
    rows, columns = rows[order], columns[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, np.arange(n_rows))[rows]  # place within its row
    return columns[rank < k].reshape(n_rows, k)


def neighbour_rows(table: CoRating, user_id: str, targets: Sequence[str], timeline: Sequence[Behaviour],
                   windows: Sequence[tuple[int, int]], history_ids: Sequence[str] | None = None) -> np.ndarray:
    """(targets, NEIGHBOUR_FEATURES): each target over the rated behaviours of its own window
    timeline[start:end] (the trainer's samples of one user see different windows; a request has one).
    `history_ids`: the timeline's item ids, where the caller has already listed them."""
    ratings = np.array([b.rating for b in timeline], dtype=np.float64).reshape(-1)  # a click (None): NaN
    rated = ~np.isnan(ratings)
    ids = [b.item_id for b in timeline] if history_ids is None else history_ids
    similarity = table.similarity(user_id, targets, ids)
    others = table.other_raters(user_id, targets) > 0
    out = np.full((len(targets), len(NEIGHBOUR_FEATURES)), np.nan)
    by_window: dict[tuple[int, int], list[int]] = {}
    for row, window in enumerate(windows):
        if others[row]:  # nobody else rated the target: missing
            by_window.setdefault(window, []).append(row)
    for (start, end), rows in by_window.items():
        keep = rated[start:end]
        if keep.any():
            out[rows] = neighbour_block(similarity[rows, start:end][:, keep], ratings[start:end][keep])
    return out
