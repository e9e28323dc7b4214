"""Figures of an evaluation: AUC / LogLoss / ACC, the served-vs-offline agreement, the paired bootstrap of
one score's gain over another, and each component's figures on the cold slices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adapters.gateway_scores import GatewayScores
from adapters.samples import Sample
from adapters.train import metrics
from service.recommend import sigmoid

AGREEMENT = 0.01  # mean |served - offline| above which the two computations disagree
# The CRM's served and offline features are the same numbers (tests/service/test_features.py), so its scores
# are too, but for the JSON round trip: a larger gap means the store is not the data (a write dated inside
# the data's time changes every later sample's item statistics).
CRM_AGREEMENT = 1e-9


def agreement(samples: Sequence[Sample], served: Sequence[float], offline: Sequence[float],
              served_prompts: Sequence[Sequence[int]], offline_prompts: Sequence[Sequence[int]]) -> dict:
    delta = np.abs(np.asarray(served) - np.asarray(offline))
    prompt_mismatch = [i for i, (a, b) in enumerate(zip(served_prompts, offline_prompts)) if list(a) != list(b)]
    worst = np.argsort(-delta)[:5]
    return {"mean_abs_delta_p": float(delta.mean()), "max_abs_delta_p": float(delta.max()),
            "agree": bool(delta.mean() < AGREEMENT and not prompt_mismatch),
            "prompt_mismatches": len(prompt_mismatch),
            "worst": [{"user_id": samples[i].user_id, "item_id": samples[i].item_id, "ts": samples[i].ts,
                       "served": float(served[i]), "offline": float(offline[i])} for i in worst]}


def crm_agreement(samples: Sequence[Sample], served: Sequence[float], offline_logits: Sequence[float]) -> dict:
    """The CRM's served probability of each sample against the CRM's logit on the raw files, made a probability
    as the gateway makes it."""
    offline = [sigmoid(float(x)) for x in offline_logits]
    delta = np.abs(np.asarray(served, dtype=np.float64) - np.asarray(offline, dtype=np.float64))
    differ = np.flatnonzero(delta > CRM_AGREEMENT)
    worst = differ[np.argsort(-delta[differ], kind="stable")][:5]
    return {"n": len(delta), "differ": len(differ), "max_abs_delta_p": float(delta.max(initial=0.0)),
            "agree": len(differ) == 0,
            "worst": [{"user_id": samples[i].user_id, "item_id": samples[i].item_id, "ts": samples[i].ts,
                       "served": float(served[i]), "offline": float(offline[i])} for i in worst]}


def require_crm_agreement(check: dict) -> None:
    """Refuse figures read from a store whose CRM scores are not those of its data's files."""
    if not check["agree"]:
        raise RuntimeError(
            f"the gateway's CRM scores {check['differ']} of {check['n']} samples unlike the CRM on the data's files "
            f"(max |delta p| {check['max_abs_delta_p']:.2g}; first {check['worst'][:2]}): its store holds writes "
            "dated inside the data's time (a benchmark's synthetic history?), which change the items' statistics "
            "that samples see (or LOREC_CRM here names another CRM than the gateway's). Ingest the data into a "
            "fresh data folder and Redis, then fit or evaluate there.")


def summarize(samples: Sequence[Sample], scores: Sequence[float]) -> dict:
    return metrics([s.label for s in samples], scores)


def paired_bootstrap(labels: Sequence[int], base: Sequence[float], other: Sequence[float], rounds: int = 1000,
                     seed: int = 0) -> dict:
    """AUC(other) - AUC(base) on the same samples, with a 95% interval from resampling the samples."""
    from sklearn.metrics import roc_auc_score

    y, a, b = np.asarray(labels), np.asarray(base), np.asarray(other)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(rounds):
        pick = rng.integers(0, len(y), len(y))
        if y[pick].min() == y[pick].max():
            continue
        deltas.append(roc_auc_score(y[pick], b[pick]) - roc_auc_score(y[pick], a[pick]))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return {"delta_auc": float(roc_auc_score(y, b) - roc_auc_score(y, a)), "ci95": [float(lo), float(hi)],
            "n": int(len(y)), "rounds": len(deltas)}


COLD_ITEM, COLD_USER = 10, 20  # fewer earlier interactions than this: a cold item / user


def component_report(samples: Sequence[Sample], served: GatewayScores, u_n: np.ndarray, i_n: np.ndarray) -> dict:
    """From one gateway pass with `explain`: each component's figures on all samples and on the cold slices,
    and the served score's gain over the CRM with its paired interval."""
    labels = np.array([s.label for s in samples])
    columns = {"served": np.asarray(served.scores),
               **{part: np.array([np.nan if c.get(part) is None else c[part] for c in served.components], dtype=float)
                  for part in ("llm", "crm")}}  # a component that did not score (the hybrid of the CRM alone): None
    columns = {k: v for k, v in columns.items() if not np.isnan(v).any()}
    slices = {"all": np.ones(len(samples), bool), "cold_items": i_n < COLD_ITEM, "cold_users": u_n < COLD_USER}
    out: dict = {}
    for name, mask in slices.items():
        if mask.sum() < 2 or len(set(labels[mask].tolist())) < 2:
            out[name] = {"n": int(mask.sum())}
            continue
        out[name] = {part: metrics(labels[mask].tolist(), values[mask]) for part, values in columns.items()}
        out[name]["n"] = int(mask.sum())
        if "crm" in columns:
            out[name]["served_vs_crm"] = paired_bootstrap(labels[mask], columns["crm"][mask],
                                                          columns["served"][mask])
    return out
