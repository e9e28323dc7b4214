"""The CRM's served-vs-offline check that guards the figures, and the writes of a benchmark that must not reach
the data's past."""

from __future__ import annotations

import importlib
import sys
import time

import pytest

from adapters.figures import crm_agreement, require_crm_agreement
from adapters.samples import Sample
from service.ingest import read_movielens
from service.recommend import sigmoid
from tests.utils.stack import ML100K, REPO


def _samples(n: int) -> list[Sample]:
    return [Sample(user_id=str(u), item_id=str(100 + u), ts=880_000_000 + u, label=u % 2, timeline=[], end=0)
            for u in range(n)]


def test_equal_crm_scores_agree():
    logits = [-2.0, 0.0, 1.0]
    check = crm_agreement(_samples(3), [sigmoid(x) for x in logits], logits)
    assert check["agree"] and check["differ"] == 0 and check["max_abs_delta_p"] == 0.0
    require_crm_agreement(check)


def test_one_sample_scored_from_other_features_refuses_the_figures_naming_it():
    logits = [-2.0, 0.0, 1.0, -1.5]
    served = [sigmoid(x) for x in logits]
    served[2] += 1e-6
    check = crm_agreement(_samples(4), served, logits)
    assert not check["agree"] and check["differ"] == 1
    assert check["worst"][0]["user_id"] == "2" and check["worst"][0]["offline"] == sigmoid(logits[2])
    with pytest.raises(RuntimeError, match="1 of 4 samples"):
        require_crm_agreement(check)


def test_perf_s_long_history_is_after_the_data_and_before_its_requests():
    """perf.py's synthetic user once wrote 2,000 ratings dated 1995 into the store it measured: every later
    evaluation of that store read other item statistics than the data's."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        perf = importlib.import_module("perf")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    now = int(time.time())
    events = perf.long_history_events("perf-user", 2000, now)
    last_rating = max(b.ts for _, b in read_movielens(ML100K).ratings)
    assert len({e["ts"] for e in events}) == 2000
    assert last_rating < min(e["ts"] for e in events) and max(e["ts"] for e in events) < now
