"""Residual training: the loss adds the CRM's logit, and the CRM's logits on its own train rows are out-of-fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from adapters.gbdt import out_of_fold_logits
from adapters.train import answer_loss, with_offsets
from service.prompt import AnswerTokens

ANSWER = AnswerTokens(yes=1, no=2)


def test_the_residual_loss_is_the_pair_loss_of_offset_plus_margin():
    logits = torch.tensor([[0.0, 2.0, -1.0, 5.0], [0.0, -0.5, 0.5, 1.0]])
    offsets, labels = [1.5, -2.0], [1, 0]
    margin = torch.tensor([3.0, -1.0]) + torch.tensor(offsets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(margin, torch.tensor([1.0, 0.0]))
    assert answer_loss(logits, labels, ANSWER, "residual", offsets).item() == pytest.approx(expected.item())
    assert answer_loss(logits, labels, ANSWER, "residual", [0.0, 0.0]).item() == pytest.approx(
        answer_loss(logits, labels, ANSWER, "pair").item())


def test_offsets_move_scores_in_logit_space():
    assert with_offsets([0.5, 0.5], [0.0, 2.0]) == pytest.approx([0.5, 1 / (1 + np.exp(-2.0))])
    assert with_offsets([0.9], [-np.log(9.0)]) == pytest.approx([0.5])


def test_out_of_fold_logits_do_not_remember_their_own_labels():
    """On labels that are pure noise, a model's logits on the rows it was fitted on separate them; the
    out-of-fold ones, from models that never saw those rows, do not."""
    import lightgbm

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3000, 5)), rng.integers(0, 2, 3000)
    names = [f"x{i}" for i in range(5)]
    params = {"objective": "binary", "num_leaves": 31, "min_child_samples": 5, "learning_rate": 0.1,
              "verbose": -1, "seed": 0, "num_boost_round": 100}
    wanted = np.arange(0, 3000, 3)
    fitted = lightgbm.train({k: v for k, v in params.items() if k != "num_boost_round"},
                            lightgbm.Dataset(x, y, feature_name=names), num_boost_round=100)
    in_sample = roc_auc_score(y[wanted], fitted.predict(x[wanted], raw_score=True))
    oof = roc_auc_score(y[wanted], out_of_fold_logits(params, names, x, y, wanted, threads=1))
    assert in_sample > 0.8 and abs(oof - 0.5) < 0.06
