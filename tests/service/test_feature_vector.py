"""The feature vector's compiled kernels compute what the Python and numpy code before them did, bit for bit.

The parity tests (test_features) hold the gateway's vectors equal to the trainer's, but both call the same
kernel; here the kernel is held to the formulas themselves (`_formulas`: the vector as it was computed in
Python before the kernel), so the shipped CRMs keep reading the vectors they were trained on.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.feature_vector import (
    GENRE_PRIOR_WEIGHT,
    ITEM_PRIOR_WEIGHT,
    PRIOR_LIKE,
    PRIOR_MEAN,
    RECENT_S,
    STARS,
    USER_FEATURES,
    FeatureSpec,
    GenreSets,
    ItemStats,
    UserSummary,
    UserView,
    candidate_rows,
    candidate_vector,
    last_ratings,
    summarize_timeline,
    user_view,
)
from service.records import Item, Profile, Timeline

GENRES = tuple(f"g{i}" for i in range(18))
SPEC = FeatureSpec(GENRES, ("artist", "doctor"))
NOW = 1_000_000_000


def _ratio(a: float, b: float, default: float) -> float:
    return a / b if b else default


def _formulas(spec: FeatureSpec, view: UserView, item_stats: ItemStats, target: Item) -> list[float]:
    """candidate_vector in plain Python: sums left to right, one quotient per ratio."""
    user, now = view.summary, view.now
    u_features, p_features = view.head[:len(USER_FEATURES)], view.head[len(USER_FEATURES):]
    u_mean = u_features[2]
    index = spec.genre_index()
    mine = sorted({index[g] for g in target.genres if g in index})
    g_means = [view.means[g] for g in mine]
    g_like = [(user.genre_liked[g] + GENRE_PRIOR_WEIGHT * PRIOR_LIKE) / (user.genre_n[g] + GENRE_PRIOR_WEIGHT)
              for g in mine]
    g_mean = _ratio(sum(g_means), len(g_means), u_mean)
    counts = item_stats.counts
    n = sum(counts[:5])
    total = sum(s * c for s, c in zip(STARS, counts))
    i_mean = (total + ITEM_PRIOR_WEIGHT * PRIOR_MEAN) / (n + ITEM_PRIOR_WEIGHT)
    raw_mean = _ratio(total, n, PRIOR_MEAN)
    i_var = _ratio(sum(s * s * c for s, c in zip(STARS, counts)), n, raw_mean * raw_mean) - raw_mean * raw_mean
    match = [_ratio(sum(user.genre_n[g] for g in mine), user.n * max(len(mine), 1), 0.0), g_mean,
             _ratio(sum(g_like), len(g_like), PRIOR_LIKE), g_mean - u_mean, max(g_means, default=u_mean),
             min(g_means, default=u_mean), u_mean - i_mean]
    item = [float(n), float(counts[5]), i_mean,
            (counts[3] + counts[4] + ITEM_PRIOR_WEIGHT * PRIOR_LIKE) / (n + ITEM_PRIOR_WEIGHT),
            math.sqrt(max(i_var, 0.0)), *(_ratio(c, n, 0.0) for c in counts[:5]), float(item_stats.recent),
            -1.0 if item_stats.first_ts is None else (now - item_stats.first_ts) / 86_400,
            float(target.year or -1), float(view.year - target.year) if target.year else -1.0,
            float(len(target.genres))]
    flags = [0.0] * len(spec.genres)
    for g in mine:
        flags[g] = 1.0
    return [*u_features, *match, *item, *p_features, *flags]


@st.composite
def views(draw) -> UserView:
    n = draw(st.integers(0, 5000))
    genre_n = draw(st.lists(st.integers(0, n), min_size=len(GENRES), max_size=len(GENRES)))
    halves = st.integers(0, 10 * max(n, 1)).map(lambda h: h / 2)  # star and half-star sums are exact
    last = tuple(draw(st.lists(st.sampled_from([0.5, 1.0, 2.5, 3.0, 4.0, 5.0]), max_size=10)))
    summary = UserSummary(
        n=n, clicks=draw(st.integers(0, 100)), rating_sum=draw(halves), rating_sq=draw(halves),
        liked=draw(st.integers(0, n)), first_ts=draw(st.none() | st.integers(0, NOW)),
        last_ts=draw(st.none() | st.integers(0, NOW)), recent=draw(st.integers(0, 100)), last_ratings=last,
        last_ratings_from=draw(st.none() | st.integers(0, NOW)), genre_n=tuple(genre_n),
        genre_sum=tuple(draw(halves) for _ in GENRES), genre_liked=tuple(draw(st.integers(0, c)) for c in genre_n))
    profile = Profile(draw(st.sampled_from([None, "male", "female"])), draw(st.sampled_from([None, "25", "56+"])),
                      draw(st.sampled_from([None, "artist", "doctor", "unknown"])))
    return user_view(SPEC, summary, profile, NOW + draw(st.integers(-10**8, 10**8)))


item_stats = st.builds(ItemStats, st.tuples(*[st.integers(0, 10**6)] * 6), st.integers(0, 10**4),
                       st.none() | st.integers(0, 2 * NOW))
targets = st.builds(Item, st.just("i"), st.just("t"), st.none() | st.integers(-10, 2100),
                    st.lists(st.sampled_from(GENRES + ("not in the spec",)), max_size=8).map(tuple))


@settings(max_examples=300, deadline=None)
@given(views(), st.lists(st.tuples(item_stats, targets), min_size=1, max_size=25))
def test_the_kernel_computes_the_formulas_bit_for_bit(view, candidates):
    rows = candidate_rows(SPEC, view, [s for s, _ in candidates], [t for _, t in candidates])
    expected = np.asarray([_formulas(SPEC, view, s, t) for s, t in candidates], dtype=np.float64)
    assert rows.shape == expected.shape
    assert rows.tobytes() == expected.tobytes()  # equal bits: also -0.0 against 0.0


def test_one_candidate_is_a_row_of_many():
    view = user_view(SPEC, UserSummary(3, 1, 11.0, 45.0, 2, 10, 20, 1, (3.0, 4.0, 4.0), 10, (3,) + (0,) * 17,
                                       (11.0,) + (0.0,) * 17, (2,) + (0,) * 17), Profile(), NOW)
    stats = [ItemStats((0, 0, 1, 2, 0, 1), 1, NOW - 86_400), ItemStats.empty()]
    items = [Item("a", "A", 1995, ("g0", "g3")), Item("b", "B", None, ())]
    rows = candidate_rows(SPEC, view, stats, items)
    assert [candidate_vector(SPEC, view, s, t) for s, t in zip(stats, items)] == rows.tolist()
    assert rows[1, len(USER_FEATURES) + 1] == view.head[2]  # no genre: the match falls back to the user's mean


def _summary_in_numpy(timeline: Timeline, genres: GenreSets, now: int) -> UserSummary:
    """summarize_timeline in numpy, its genre sums over each behaviour's own genres."""
    rated = ~np.isnan(timeline.ratings)
    values = np.where(rated, timeline.ratings, 0.0)
    genre_n, genre_sum, genre_liked = np.stack([rated, values, values > 3]).astype(np.float64) @ genres.membership()
    times, n = timeline.ts, int(rated.sum())
    last, last_from = last_ratings(timeline, 0, len(timeline))
    return UserSummary(n=n, clicks=len(timeline) - n, rating_sum=float(values.sum()),
                       rating_sq=float((values * values).sum()), liked=int((values > 3).sum()),
                       first_ts=int(times[0]) if len(times) else None, last_ts=int(times[-1]) if len(times) else None,
                       recent=len(times) - int(np.searchsorted(times, now - RECENT_S)),
                       last_ratings=last, last_ratings_from=last_from,
                       genre_n=tuple(int(v) for v in genre_n.tolist()), genre_sum=tuple(genre_sum.tolist()),
                       genre_liked=tuple(int(v) for v in genre_liked.tolist()))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.none() | st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0]),
                          st.integers(0, 5), st.integers(0, 10**6)), max_size=300),
       st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=6, max_size=6), st.integers(0, 10**6))
def test_the_compiled_summary_equals_the_numpy_one(events, table, now):
    events = sorted(events, key=lambda e: e[2])
    timeline = Timeline([f"i{k}" for k in range(len(events))], np.array([e[2] for e in events], dtype=np.int64),
                        np.array([np.nan if e[0] is None else e[0] for e in events], dtype=np.float64))
    genres = GenreSets(np.array([e[1] for e in events], dtype=np.int64), np.array(table, dtype=np.float64))
    assert summarize_timeline(timeline, genres, now) == _summary_in_numpy(timeline, genres, now)
