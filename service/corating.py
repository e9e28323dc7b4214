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

A table fitted with `taste` also holds how: each rating centred on its rater's mean, in steps of 1/64 of a
star (`TASTE_STEPS`). The taste similarity of two items is the cosine of those centred rows (item-based
CF's adjusted cosine), the user's own column left out as above: two items are close when the same people
liked both more than they like things on average, not merely when the same people watched both. It is the
stronger signal (validation AUC on ML-100K 0.7645 -> 0.7728 added to the co-rating features).

The features of a candidate, per similarity, over the rated behaviours of the history the request reads:
the mean rating and liked share of the K most similar, their similarity-weighted mean rating, the top
similarity, the mean similarity to liked and to disliked items and its gap. Missing (NaN, LightGBM's
missing value) where the history has no rating or nobody else rated the candidate. Counts and centred
ratings are integers, so their products and sums are exact in any order, and every similarity is one
division: a similarity does not depend on which other items share the batch, and the gateway's vectors
equal the trainer's. Both compute them in one compiled pass per target (numba: the similarities where
they are needed, the nearest kept as they come), in numpy's operations and summation order: the bits of the
numpy definition the shipped CRMs were trained on (test_corating), at about a quarter of its cost in a
request's features stage (benchmarks/results/features.json).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from scipy import sparse

from service.item_ids import ItemPositions
from service.records import Behaviour, Timeline

NEIGHBOUR_FEATURES = ("n_knn_mean", "n_knn_like", "n_knn_wmean", "n_top_sim", "n_sim_liked", "n_sim_disliked",
                      "n_sim_gap")
TASTE_FEATURES = tuple(f"t_{name[2:]}" for name in NEIGHBOUR_FEATURES)  # the same, over the taste similarity
TASTE_STEPS = 64  # centred ratings are held as whole 1/64ths of a star: integer products, exact sums
K_NEAREST = 10
DENSE_ITEMS = 8192  # up to this many items a table keeps every pair's count (8192: 256 MB)


class CoRating:
    """Who rated which item before `cutoff` (and, with taste, how), and item similarities from it."""

    def __init__(self, items: Sequence[str], users: Sequence[str], rated: sparse.csr_matrix, cutoff: int,
                 dense_items: int = DENSE_ITEMS, stars: sparse.csr_matrix | None = None) -> None:
        self.items, self.users, self.cutoff = list(items), list(users), cutoff
        self.row_of = ItemPositions(self.items)  # looks a history read from Redis up without making its strings
        self.column_of = {user_id: n for n, user_id in enumerate(self.users)}
        # Every pair's count, when the catalog is small enough: a request then gathers its counts instead of
        # multiplying its candidates' rows (10x faster on ML-1M). int16 holds counts below 2^15 exactly (either
        # MovieLens), float32 those below 2^24.
        self.watched = _Cosine(rated.astype(np.float64), (np.int16, np.float32), len(self.items) <= dense_items)
        self.stars = stars.tocsr() if stars is not None else None
        self.taste = (_Cosine(centred(self.stars), (np.int16, np.int32), len(self.items) <= dense_items)
                      if self.stars is not None else None)

    @property
    def rated(self) -> sparse.csr_matrix:
        return self.watched.rows

    @property
    def raters(self) -> np.ndarray:
        return self.watched.squares  # a 0/1 row's sum of squares is its count

    @property
    def pair_counts(self) -> np.ndarray | None:
        return self.watched.pairs

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (*NEIGHBOUR_FEATURES, *(TASTE_FEATURES if self.taste is not None else ()))

    @classmethod
    def fit(cls, ratings: Iterable[tuple[str, Behaviour]], cutoff: int, taste: bool = False) -> CoRating:
        """The table of every rating before `cutoff` (a user's latest rating of an item where they rated it
        again); with `taste`, the ratings themselves too."""
        latest = {(user_id, b.item_id): b.rating for user_id, b in sorted(ratings, key=lambda r: r[1].ts)
                  if b.ts < cutoff and b.rating is not None}
        pairs = sorted(latest)
        items = sorted({item_id for _, item_id in pairs})
        users = sorted({user_id for user_id, _ in pairs})
        row_of = {item_id: n for n, item_id in enumerate(items)}
        column_of = {user_id: n for n, user_id in enumerate(users)}
        rows = [row_of[item_id] for _, item_id in pairs]
        columns = [column_of[user_id] for user_id, _ in pairs]
        shape = (len(items), len(users))
        rated = sparse.csr_matrix((np.ones(len(pairs)), (rows, columns)), shape=shape)
        stars = (sparse.csr_matrix((np.array([latest[p] for p in pairs], dtype=np.float64), (rows, columns)),
                                   shape=shape) if taste else None)
        return cls(items, users, rated, cutoff, stars=stars)

    def save(self, path: Path) -> None:
        rated = self.rated.tocsr()
        extra = {}
        if self.stars is not None:  # the same sparsity as `rated` (both built from the same pairs)
            extra["stars"] = self.stars.tocsr().data.astype(np.float32)
        np.savez_compressed(path, items=np.array(self.items), users=np.array(self.users), cutoff=self.cutoff,
                            indptr=rated.indptr, indices=rated.indices.astype(np.int32), **extra)

    @classmethod
    def load(cls, path: Path) -> CoRating:
        with np.load(path, allow_pickle=False) as f:
            items, users = f["items"].tolist(), f["users"].tolist()
            indices, indptr = f["indices"], f["indptr"]
            shape = (len(items), len(users))
            rated = sparse.csr_matrix((np.ones(len(indices)), indices, indptr), shape=shape)
            stars = (sparse.csr_matrix((f["stars"].astype(np.float64), indices, indptr), shape=shape)
                     if "stars" in f.files else None)
            return cls(items, users, rated, int(f["cutoff"]), stars=stars)

    @classmethod
    def without_pair_counts(cls, table: CoRating) -> CoRating:
        """The same table computing each request's products from the sparse rows (a catalog too large for
        the dense pair products)."""
        return cls(table.items, table.users, table.rated, table.cutoff, dense_items=0, stars=table.stars)

    def similarity(self, user_id: str, targets: Sequence[str], history: Sequence[str]) -> np.ndarray:
        """(targets, history) cosine of the items' 0/1 rows without `user_id`'s column; 0 for an unknown item."""
        return self.watched.cosine(self.pairing(user_id, targets, history))

    def taste_similarity(self, user_id: str, targets: Sequence[str], history: Sequence[str]) -> np.ndarray:
        """(targets, history) cosine of the items' centred rating rows without `user_id`'s column."""
        if self.taste is None:
            raise ValueError("this co-rating table holds no ratings (fitted without taste)")
        return self.taste.cosine(self.pairing(user_id, targets, history))

    def similarities(self, user_id: str, targets: Sequence[str], history: Sequence[str]) -> list[np.ndarray]:
        """The co-rating similarity, then the taste similarity where the table holds ratings (one lookup of
        the items for both: a request's history has thousands)."""
        pairing = self.pairing(user_id, targets, history)
        return [m.cosine(pairing) for m in self.matrices]

    def pairing(self, user_id: str, targets: Sequence[str], history: Sequence[str] | np.ndarray) -> _Pairing:
        """The table rows of the targets and the history (item ids, or their `rows_of` where the caller has
        looked them up), and the user's column."""
        t_rows, t_known = _known(self.rows_of(targets))
        h_rows, h_known = _known(history if isinstance(history, np.ndarray) else self.rows_of(history))
        return _Pairing(t_rows, t_known, h_rows, h_known, self.column_of.get(user_id))

    def other_raters(self, user_id: str, targets: Sequence[str]) -> np.ndarray:
        """How many people but the user rated each target before the cutoff (none: its features are missing)."""
        rows, known = _known(self.rows_of(targets))
        return (self.raters[rows] - self.watched.column(self.column_of.get(user_id))[rows]) * known

    def rows_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Each item's row in the table, -1 for an item it does not hold."""
        return self.row_of.positions(item_ids)

    def compile_kernel(self) -> None:
        """Compile the features kernel for this table's matrices now, not on the first request: numba
        compiles on a type's first call (~3 s each here, where its cache under __pycache__ is not there yet)."""
        if self.items:
            first = self.items[0]  # rated by someone: both matrices' kernels run
            neighbour_rows(self, "", [first], Timeline.of([Behaviour(first, 0, 4.0)]), [(0, 1)])

    @property
    def matrices(self) -> list[_Cosine]:
        """The co-rating matrix, then the taste one where the table holds ratings (feature_names' order)."""
        return [m for m in (self.watched, self.taste) if m is not None]


def _known(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows usable as indices (0 for an unknown item) and 1.0 where the item is known."""
    return np.maximum(rows, 0), (rows >= 0).astype(np.float64)


def centred(stars: sparse.csr_matrix) -> sparse.csr_matrix:
    """(items, users) each rating minus its rater's mean rating, in whole TASTE_STEPS of a star (int64)."""
    by_user = stars.tocsc()
    counts = np.diff(by_user.indptr)
    means = np.asarray(by_user.sum(axis=0)).ravel() / np.maximum(counts, 1)
    steps = np.rint((by_user.data - np.repeat(means, counts)) * TASTE_STEPS).astype(np.int64)
    return sparse.csc_matrix((steps, by_user.indices, by_user.indptr), shape=stars.shape).tocsr()


@dataclass(frozen=True, slots=True)
class _Pairing:
    """The table rows of a request's targets and history items (0, unknown, where `known` is 0) and the
    table column of the requesting user (None for someone it does not know)."""

    t_rows: np.ndarray
    t_known: np.ndarray
    h_rows: np.ndarray
    h_known: np.ndarray
    column: int | None


class _Cosine:
    """One matrix (items x users) whose rows' cosines a table computes: its rows, their squared norms, and
    every pair's product where the catalog is small enough (gathered instead of multiplied per request)."""

    def __init__(self, rows: sparse.csr_matrix, pair_dtypes: tuple[type, ...], dense: bool) -> None:
        self.rows = rows.tocsr()
        self.by_user = self.rows.T.tocsr()  # users x items: one user's column is one row here
        self.squares = np.asarray(self.rows.multiply(self.rows).sum(axis=1)).ravel().astype(np.float64)
        self.pairs = _narrowed((self.rows @ self.rows.T).toarray(), pair_dtypes) if dense else None

    def cosine(self, p: _Pairing) -> np.ndarray:
        """(targets, history) cosine of the rows with the user's column left out; 0 for an unknown item: the
        operands below in numpy, whole arrays at once (the definition the features kernel matches bit for bit;
        someone the table does not know has a zero column, whose products take nothing off)."""
        table, t_index, h_index, t_mine, h_mine, t_square, h_square = self.operands(p)
        products = table.take(t_index, axis=0).take(h_index, axis=1).astype(np.float64) - np.outer(t_mine, h_mine)
        norms = np.sqrt(np.outer(t_square, h_square))
        return np.divide(products, norms, out=np.zeros_like(products), where=norms > 0)

    def operands(self, p: _Pairing) -> tuple[np.ndarray, ...]:
        """What a cosine is computed from: a table of products and each target's and history item's index in
        it (every pair's product, or the request's own where the catalog is too large for them), the user's
        entries to take off the products, and each side's squared norm without them (0 for an unknown item)."""
        mine = self.column(p.column)
        squares = self.squares - mine * mine
        if self.pairs is not None:
            table, t_index, h_index = self.pairs, p.t_rows, p.h_rows
        else:  # grows with the raters
            table = (self.rows[p.t_rows] @ self.by_user).toarray()[:, p.h_rows].astype(np.float64)
            t_index, h_index = np.arange(len(p.t_rows)), np.arange(len(p.h_rows))
        return (table, t_index, h_index, mine[p.t_rows], mine[p.h_rows], squares[p.t_rows] * p.t_known,
                squares[p.h_rows] * p.h_known)

    def column(self, column: int | None) -> np.ndarray:
        """A user's column as a dense vector over the items (zeros for someone the table does not know)."""
        out = np.zeros(self.rows.shape[0])
        if column is not None:  # the CSR row's slices: scipy's row indexing costs 50 us a call
            start, end = self.by_user.indptr[column], self.by_user.indptr[column + 1]
            out[self.by_user.indices[start:end]] = self.by_user.data[start:end]
        return out


def _narrowed(pairs: np.ndarray, dtypes: tuple[type, ...]) -> np.ndarray:
    """`pairs` in the first of `dtypes` that holds every value exactly (a request reads 40 rows of them from
    memory: the narrower, the fewer cache lines), else as they are."""
    for dtype in dtypes:
        narrow = pairs.astype(dtype)
        if np.array_equal(narrow, pairs):
            return narrow
    return pairs


def neighbour_block(similarity: np.ndarray, ratings: np.ndarray, k: int = K_NEAREST) -> np.ndarray:
    """(targets, NEIGHBOUR_FEATURES) from each target's similarity (a row) to the same rated history items
    (columns, time order) and their ratings."""
    targets, n = similarity.shape
    out = np.full((targets, len(NEIGHBOUR_FEATURES)), np.nan)
    if n:  # the similarity as cosine operands: s - 0 * 0 over sqrt(1 * 1) is s
        given = (np.asarray(similarity, dtype=np.float64), np.arange(targets), np.arange(n), np.zeros(targets),
                 np.zeros(n), np.ones(targets), np.ones(n))
        _block(given, np.arange(targets), np.arange(n), np.asarray(ratings, dtype=np.float64), k, out, 0)
    return out


@numba.njit(cache=True, nogil=True)
def _sum(values: np.ndarray, n: int) -> float:  # pragma: no cover - compiled
    """numpy's pairwise summation of values[:n] (np.add.reduce over a contiguous row, float64), step for
    step: the features equal those the shipped CRMs were trained on, computed with numpy, to the last bit."""
    if n < 8:
        total = -0.0
        for i in range(n):
            total += values[i]
        return total
    if n <= 128:
        r = values[:8].copy()
        i = 8
        while i < n - n % 8:
            for j in range(8):
                r[j] += values[i + j]
            i += 8
        total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        while i < n:
            total += values[i]
            i += 1
        return total
    half = n // 2
    half -= half % 8
    return _sum(values, half) + _sum(values[half:], n - half)


@numba.njit(cache=True, nogil=True, error_model="numpy")  # numpy's: x / 0 is inf, not an exception
def _block(cosine: tuple, rows: np.ndarray, columns: np.ndarray, ratings: np.ndarray, k: int, out: np.ndarray,
           offset: int) -> None:  # pragma: no cover - compiled
    """out[row, offset:offset + 7] = the NEIGHBOUR_FEATURES of each of `rows` (targets) over `columns` (rated
    history items, ascending), row by row: the row's similarities from `cosine` (_Cosine.operands), then one
    pass keeping the nearest as they come and the liked and disliked apart, where numpy took a dozen passes
    over a (rows, columns) similarity matrix. The K nearest are the stable top K (`np.argsort(-row,
    kind="stable")[:k]`: ties, the earlier behaviour first)."""
    table, t_index, h_index, t_mine, h_mine, t_square, h_square = cosine
    n = len(columns)
    m = min(k, n)
    top_sim, top_col = np.empty(m), np.empty(m, np.int64)
    products, similarity, liked, disliked = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    buffer = np.empty(m)
    h, h_m, h_s = h_index[columns], h_mine[columns], h_square[columns]
    liking = (ratings[columns] > 3).astype(np.int64)
    for row in rows:
        t, mine, square = t_index[row], t_mine[row], t_square[row]
        products[:] = table[t][h]
        for i in range(n):  # no gather and no branch: vectorised (2x); a zero norm's quotient is dropped
            norm = np.sqrt(square * h_s[i])
            quotient = (products[i] - mine * h_m[i]) / norm
            similarity[i] = quotient if norm > 0 else 0.0
        kept = 0
        n_liked = n_disliked = 0
        for i in range(n):
            s, column = similarity[i], columns[i]
            liked[n_liked] = s  # both written, one kept: no branch on the rating (a random one mispredicts)
            disliked[n_disliked] = s
            n_liked += liking[i]
            n_disliked += 1 - liking[i]
            if kept == m and not s > top_sim[m - 1]:
                continue
            place = kept if kept < m else m - 1
            while place > 0 and s > top_sim[place - 1]:  # strictly: an equal earlier one stays ahead
                top_sim[place], top_col[place] = top_sim[place - 1], top_col[place - 1]
                place -= 1
            top_sim[place], top_col[place] = s, column
            kept = min(kept + 1, m)
        for i in range(m):
            buffer[i] = ratings[top_col[i]]
        out[row, offset] = _sum(buffer, m) / m
        for i in range(m):
            buffer[i] = 1.0 if ratings[top_col[i]] > 3 else 0.0
        out[row, offset + 1] = _sum(buffer, m) / m
        for i in range(m):
            buffer[i] = (max(top_sim[i], 0.0) + 1e-6) * ratings[top_col[i]]
        weighted = _sum(buffer, m)
        for i in range(m):
            buffer[i] = max(top_sim[i], 0.0) + 1e-6
        out[row, offset + 2] = weighted / _sum(buffer, m)
        out[row, offset + 3] = top_sim[0]
        to_liked = _sum(liked, n_liked) / n_liked if n_liked else np.nan
        to_disliked = _sum(disliked, n_disliked) / n_disliked if n_disliked else np.nan
        out[row, offset + 4], out[row, offset + 5] = to_liked, to_disliked
        out[row, offset + 6] = (0.0 if n_liked == 0 else to_liked) - (0.0 if n_disliked == 0 else to_disliked)


def neighbour_rows(table: CoRating, user_id: str, targets: Sequence[str], timeline: Timeline,
                   windows: Sequence[tuple[int, int]], history_rows: np.ndarray | None = None) -> np.ndarray:
    """(targets, table.feature_names): each target over the rated behaviours of its own window
    timeline[start:end] (the trainer's samples of one user see different windows; a request has one).
    `history_rows`: the timeline's items' `table.rows_of`, where the caller already has them."""
    ratings = timeline.ratings
    rated = ~np.isnan(ratings)
    pairing = table.pairing(user_id, targets, timeline.item_ids if history_rows is None else history_rows)
    cosines = [m.operands(pairing) for m in table.matrices]
    others = table.other_raters(user_id, targets) > 0
    out = np.full((len(targets), len(table.feature_names)), np.nan)
    by_window: dict[tuple[int, int], list[int]] = {}
    for row, window in enumerate(windows):
        if others[row]:  # nobody else rated the target: missing
            by_window.setdefault(window, []).append(row)
    for (start, end), rows in by_window.items():
        columns = start + np.flatnonzero(rated[start:end])
        if len(columns):
            for n, cosine in enumerate(cosines):
                _block(cosine, np.asarray(rows), columns, ratings, K_NEAREST, out, n * len(NEIGHBOUR_FEATURES))
    return out
