"""The co-rating table behind the CRM's neighbour features: other people's ratings only, before the cutoff."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from adapters.features import OfflineFeatures
from adapters.samples import build_samples, split_by_time
from service.artifacts import ArtifactError
from service.corating import (
    NEIGHBOUR_FEATURES,
    TASTE_FEATURES,
    TASTE_STEPS,
    CoRating,
    centred,
    neighbour_block,
    neighbour_rows,
)
from service.crm import Crm
from service.records import Behaviour, Timeline
from tests.utils.crm import build_crm
from tests.utils.stack import ML100K

# Users a, b, c rate items x, y, z (all before t=100); d rates x at 200, after the cutoff.
RATINGS = [("a", Behaviour("x", 1, 5.0)), ("a", Behaviour("y", 2, 4.0)),
           ("b", Behaviour("x", 3, 2.0)), ("b", Behaviour("y", 4, 1.0)), ("b", Behaviour("z", 5, 3.0)),
           ("c", Behaviour("z", 6, 5.0)), ("c", Behaviour("w", 7, None)),  # a click is not a rating
           ("d", Behaviour("x", 200, 5.0))]


def table() -> CoRating:
    return CoRating.fit(RATINGS, cutoff=100)


def test_the_table_holds_ratings_before_the_cutoff_only():
    t = table()
    assert t.items == ["x", "y", "z"] and t.users == ["a", "b", "c"]
    assert t.raters.tolist() == [2.0, 2.0, 2.0]


def test_similarity_is_the_cosine_of_other_peoples_ratings():
    t = table()
    # Someone new: x and y share raters a and b (2 / sqrt(2 * 2)); x and z share b (1 / 2).
    assert t.similarity("new", ["x"], ["y", "z", "unknown"]).tolist() == [[1.0, 0.5, 0.0]]
    # User a is taken out: x and y keep only b (1 / sqrt(1 * 1)); x and z keep b over 1 and 2 raters.
    assert t.similarity("a", ["x"], ["y", "z"]).tolist() == [[1.0, 1 / math.sqrt(2)]]
    # User b is taken out: x, y have only a; z only c: nothing shared.
    assert t.similarity("b", ["x"], ["y", "z"]).tolist() == [[1.0, 0.0]]


def test_centred_ratings_are_whole_steps_around_each_raters_mean():
    t = CoRating.fit(RATINGS, cutoff=100, taste=True)
    steps = centred(t.stars).toarray()  # items x, y, z; users a (mean 4.5), b (2), c (5)
    assert steps.dtype == np.int64
    assert steps.tolist() == [[TASTE_STEPS // 2, 0, 0], [-TASTE_STEPS // 2, -TASTE_STEPS, 0], [0, TASTE_STEPS, 0]]


def test_taste_similarity_is_the_cosine_of_centred_ratings_without_the_user():
    t = CoRating.fit(RATINGS, cutoff=100, taste=True)
    # Someone new: x and y share a (+1/2, -1/2 star) and b (0, -1): -1/4 over sqrt(1/4 * (1/4 + 1)).
    assert np.allclose(t.taste_similarity("new", ["x"], ["y", "z", "unknown"]), [[-1 / math.sqrt(5), 0.0, 0.0]])
    # y and z share b only, who rated y below and z above their mean: opposite tastes.
    assert np.allclose(t.taste_similarity("new", ["y"], ["z"]), [[-64 * 64 / math.sqrt(5 * 32 * 32 * 64 * 64)]])
    # Without b, y and z share nobody; without a, x's only other rater (b) sits at their mean: no signal.
    assert t.taste_similarity("b", ["y"], ["z"]).tolist() == [[0.0]]
    assert t.taste_similarity("a", ["x"], ["y"]).tolist() == [[0.0]]
    # The co-rating similarity of the same table is unchanged by holding the ratings.
    assert np.array_equal(t.similarity("a", ["x"], ["y", "z"]), table().similarity("a", ["x"], ["y", "z"]))
    with pytest.raises(ValueError, match="no ratings"):
        table().taste_similarity("a", ["x"], ["y"])


def test_a_rating_given_again_counts_once_with_its_latest_value():
    again = [*RATINGS, ("a", Behaviour("x", 50, 1.0))]  # a re-rates x before the cutoff
    t = CoRating.fit(again, cutoff=100, taste=True)
    assert t.raters.tolist() == [2.0, 2.0, 2.0]
    assert t.stars[t.row_of["x"], t.column_of["a"]] == 1.0


def test_a_users_own_ratings_never_show_in_their_similarities():
    data_ratings = [r for r in RATINGS if r[0] != "a"]
    without_a = CoRating.fit(data_ratings, cutoff=100)
    with_a = table()
    for user in ("a",):
        assert np.array_equal(with_a.similarity(user, ["x", "y", "z"], ["x", "y", "z"]),
                              without_a.similarity(user, ["x", "y", "z"], ["x", "y", "z"]))
    tasted_with, tasted_without = CoRating.fit(RATINGS, 100, taste=True), CoRating.fit(data_ratings, 100, taste=True)
    assert np.array_equal(tasted_with.taste_similarity("a", ["x", "y", "z"], ["x", "y", "z"]),
                          tasted_without.taste_similarity("a", ["x", "y", "z"], ["x", "y", "z"]))


def test_features_are_missing_without_rated_history_or_other_raters():
    t = table()
    history = [Behaviour("y", 10, 4.0), Behaviour("z", 11, 1.0), Behaviour("w", 12, None)]
    rows = neighbour_rows(t, "new", ["x", "unknown"], Timeline.of(history), [(0, 3), (0, 3)])
    assert rows.shape == (2, len(NEIGHBOUR_FEATURES))
    # x: y (sim 1, rated 4) then z (0.5, rated 1); K covers both.
    named = dict(zip(NEIGHBOUR_FEATURES, rows[0]))
    assert named["n_top_sim"] == 1.0 and named["n_knn_mean"] == 2.5 and named["n_knn_like"] == 0.5
    assert named["n_sim_liked"] == 1.0 and named["n_sim_disliked"] == 0.5 and named["n_sim_gap"] == 0.5
    assert np.isnan(rows[1]).all(), "nobody rated the candidate"
    clicks_only = neighbour_rows(t, "new", ["x"], Timeline.of([Behaviour("w", 12, None)]), [(0, 1)])
    assert np.isnan(clicks_only).all(), "no rated history"
    # z's only rater other than b is c: for b it is rated by someone else; x for a new user too.
    assert t.other_raters("b", ["z", "x"]).tolist() == [1.0, 1.0]
    assert CoRating.fit(RATINGS[:2], 100).other_raters("a", ["x"]).tolist() == [0.0]


def test_a_taste_table_adds_the_taste_features_after_the_co_rating_ones():
    t = CoRating.fit(RATINGS, cutoff=100, taste=True)
    assert t.feature_names == (*NEIGHBOUR_FEATURES, *TASTE_FEATURES) and table().feature_names == NEIGHBOUR_FEATURES
    history = [Behaviour("y", 10, 4.0), Behaviour("z", 11, 1.0), Behaviour("w", 12, None)]
    rows = neighbour_rows(t, "new", ["x", "unknown"], Timeline.of(history), [(0, 3), (0, 3)])
    assert rows.shape == (2, len(NEIGHBOUR_FEATURES) + len(TASTE_FEATURES))
    assert np.array_equal(rows[:, :len(NEIGHBOUR_FEATURES)], neighbour_rows(table(), "new", ["x", "unknown"],
                                                                            Timeline.of(history), [(0, 3), (0, 3)]),
                          equal_nan=True)
    named = dict(zip(t.feature_names, rows[0]))
    # x over y (taste -1/sqrt 5, rated 4) and z (0, rated 1): z is the nearer in taste.
    assert named["t_top_sim"] == 0.0 and np.isclose(named["t_sim_liked"], -1 / math.sqrt(5))
    assert np.isnan(rows[1]).all(), "nobody rated the candidate"


def test_a_window_limits_the_history_a_target_sees():
    t = table()
    history = [Behaviour("y", 10, 4.0), Behaviour("z", 11, 1.0)]
    rows = neighbour_rows(t, "new", ["x", "x"], Timeline.of(history), [(0, 1), (0, 2)])
    assert rows[0][NEIGHBOUR_FEATURES.index("n_knn_mean")] == 4.0
    assert rows[1][NEIGHBOUR_FEATURES.index("n_knn_mean")] == 2.5


def test_pair_counts_and_sparse_rows_give_the_same_similarities():
    from service.ingest import read_movielens

    data = read_movielens(ML100K)
    dense = CoRating.fit(data.ratings, 880_000_000, taste=True)
    rows = CoRating.without_pair_counts(dense)
    assert dense.pair_counts is not None and rows.pair_counts is None
    assert dense.taste.pairs.dtype == np.int32 and rows.taste.pairs is None  # exact integers, half of int64
    history = [b.item_id for user_id, b in data.ratings[:3000] if user_id == data.ratings[0][0]] + ["unknown"]
    for user in (data.ratings[0][0], "someone new"):
        targets = dense.items[:50] + ["unknown"]
        similarity = dense.similarity(user, targets, history)
        assert np.array_equal(similarity, rows.similarity(user, targets, history))
        assert (similarity > 0).sum() > 100
        taste = dense.taste_similarity(user, targets, history)
        assert np.array_equal(taste, rows.taste_similarity(user, targets, history))
        assert (taste > 0).sum() > 100 and (taste < 0).sum() > 100


def test_saved_and_loaded_tables_give_the_same_similarities(tmp_path):
    t = table()
    t.save(tmp_path / "t.npz")
    loaded = CoRating.load(tmp_path / "t.npz")
    assert loaded.items == t.items and loaded.users == t.users and loaded.cutoff == 100
    assert loaded.taste is None, "a table saved without ratings (the CRMs of before) loads without taste"
    for user in ("a", "b", "new"):
        assert np.array_equal(loaded.similarity(user, t.items, t.items), t.similarity(user, t.items, t.items))
    tasted = CoRating.fit(RATINGS, cutoff=100, taste=True)
    tasted.save(tmp_path / "tasted.npz")
    loaded = CoRating.load(tmp_path / "tasted.npz")
    for user in ("a", "b", "new"):
        assert np.array_equal(loaded.taste_similarity(user, t.items, t.items),
                              tasted.taste_similarity(user, t.items, t.items))


@pytest.mark.parametrize("taste", [False, True], ids=["co-rating", "taste"])
def test_training_samples_do_not_see_their_own_label_through_the_table(taste):
    """A train sample's rating lies before the cutoff, so it is in the table: leaving the user out must make
    its neighbour features those of a table without that user at all."""
    from service.ingest import read_movielens

    data = read_movielens(ML100K)
    parts = split_by_time(build_samples(data))
    cutoff = min(s.ts for s in parts["valid"])
    sample = parts["train"][len(parts["train"]) // 2]
    full = CoRating.fit(data.ratings, cutoff, taste=taste)
    others = CoRating.fit([r for r in data.ratings if r[0] != sample.user_id], cutoff, taste=taste)
    spec = OfflineFeatures(data).spec
    with_user = OfflineFeatures(data, replace(spec, corating=full)).matrix([sample])
    without_user = OfflineFeatures(data, replace(spec, corating=others)).matrix([sample])
    assert np.array_equal(with_user, without_user, equal_nan=True)
    assert np.isfinite(with_user[0, -len(full.feature_names):]).all()


def test_a_crm_refuses_a_table_that_is_not_the_one_its_manifest_names(tmp_path):
    folder = build_crm(tmp_path, ML100K, name="with-table")
    crm = Crm(folder)
    assert crm.spec.corating is not None
    assert crm.spec.names[-len(NEIGHBOUR_FEATURES) - len(TASTE_FEATURES):] == (*NEIGHBOUR_FEATURES, *TASTE_FEATURES)
    table_file = folder / crm.manifest.corating_file
    table_file.write_bytes(table_file.read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="corating"):
        Crm(folder)


@pytest.mark.parametrize("seed", range(20))
def test_the_nearest_are_the_stable_top_k_of_each_row(seed):
    """Ties everywhere: the K nearest are `np.argsort(-row, kind="stable")[:k]` (the earlier behaviour first),
    seen through the features that depend on which ones they are (their ratings, their similarities)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60)) if seed < 10 else int(rng.integers(60, 3000))
    similarity = rng.choice([-0.5, 0.0, 0.1, 0.25, 0.5, 1.0], size=(3, n))
    similarity[0] = rng.normal(size=n)  # none
    ratings = rng.integers(1, 6, n).astype(np.float64)
    for k in (1, 3, 10):
        expected = np.array([one_candidate(row, ratings, k) for row in similarity])
        assert np.array_equal(neighbour_block(similarity, ratings, k), expected, equal_nan=True)


def test_a_rows_features_do_not_depend_on_the_rows_batched_with_it():
    rng = np.random.default_rng(0)
    similarity = rng.random((20, 700)) * (rng.random((20, 700)) < 0.3)
    ratings = rng.integers(1, 6, 700).astype(np.float64)
    batch = neighbour_block(similarity, ratings)
    alone = np.vstack([neighbour_block(similarity[r:r + 1], ratings) for r in range(20)])
    assert np.array_equal(batch, alone) and np.isfinite(batch).all()


def one_candidate(similarity: np.ndarray, ratings: np.ndarray, k: int = 10) -> list[float]:
    """The features of one candidate as first defined (and as the shipped CRMs were trained on)."""
    top = np.argsort(-similarity, kind="stable")[:k]
    weights = np.maximum(similarity[top], 0) + 1e-6
    liked = ratings > 3
    to_liked = float(similarity[liked].mean()) if liked.any() else np.nan
    to_disliked = float(similarity[~liked].mean()) if (~liked).any() else np.nan
    return [float(ratings[top].mean()), float(liked[top].mean()),
            float((weights * ratings[top]).sum() / weights.sum()), float(similarity[top[0]]),
            to_liked, to_disliked, float(np.nan_to_num(to_liked) - np.nan_to_num(to_disliked))]


@pytest.mark.parametrize("n", [1, 5, 10, 37, 700, 2000])
def test_the_batched_features_equal_the_one_candidate_definition(n):
    rng = np.random.default_rng(n)
    similarity = (rng.random((20, n)) - 0.2) * (rng.random((20, n)) < 0.3)  # taste similarities go below 0
    for ratings in (rng.integers(1, 6, n).astype(np.float64), np.full(n, 5.0), np.full(n, 2.0)):
        expected = np.array([one_candidate(row, ratings) for row in similarity])
        assert np.array_equal(neighbour_block(similarity, ratings), expected, equal_nan=True)


def test_a_requests_rows_are_each_similaritys_one_candidate_features():
    """A request's rows (all candidates in one block per similarity, clicks left out) are what one candidate
    over each similarity gives: the definition the shipped CRMs were trained on."""
    from service.ingest import read_movielens

    data = read_movielens(ML100K)
    t = CoRating.fit(data.ratings, 880_000_000, taste=True)
    user = data.ratings[0][0]
    history = sorted((b for u, b in data.ratings if u == user), key=lambda b: b.ts)
    history[3] = Behaviour(history[3].item_id, history[3].ts, None)  # a click: left out of the features
    targets = t.items[100:120] + ["unknown"]
    rows = neighbour_rows(t, user, targets, Timeline.of(history), [(0, len(history))] * len(targets))
    rated = [b for b in history if b.rating is not None]
    ratings = np.array([b.rating for b in rated])
    similarities = t.similarities(user, targets, [b.item_id for b in rated])
    for n, target in enumerate(targets[:-1]):
        expected = [value for s in similarities for value in one_candidate(s[n], ratings)]
        assert np.array_equal(rows[n], expected, equal_nan=True), target
    assert np.isnan(rows[-1]).all() and np.isfinite(rows[:-1]).all()


def test_a_loaded_crm_has_its_features_kernel_compiled_for_its_table(tmp_path):
    """In a fresh process (numba compiles a type on its first call): after loading the CRM, the kernel holds
    a compiled version for each of its table's matrices, so no request pays the compilation."""
    import subprocess
    import sys

    folder = build_crm(tmp_path, ML100K, name="compiled")
    script = ("import sys; from service.corating import _block; from service.crm import Crm; "
              "crm = Crm(__import__('pathlib').Path(sys.argv[1])); "
              "print(sorted({str(s[0].types[0].dtype) for s in _block.signatures}))")
    shown = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, check=True)
    matrices = Crm(folder).spec.corating.matrices
    assert shown.stdout.split("\n")[-2] == str(sorted({str(m.pairs.dtype) for m in matrices}))


def test_pair_counts_are_kept_in_the_narrowest_exact_type():
    """int16 where every count fits (either MovieLens), the wider type where one does not: never a wrapped
    count, so the similarities stay the trainer's."""
    assert table().watched.pairs.dtype == np.int16
    many = [(f"u{u}", Behaviour(item, 1, 4.0)) for u in range(40_000) for item in ("x", "y")]
    wide = CoRating.fit(many, 100)
    assert wide.watched.pairs.dtype == np.float32 and wide.watched.pairs[0, 1] == 40_000
