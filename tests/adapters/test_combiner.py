"""The combiner: which terms its fit chooses (the LLM enters only where it beats the CRM alone), and the
artifact's identity (a re-fit on the same samples keeps the artifact, another fit is refused)."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.combiner import TERM_SETS, FitRows, _same_fit, fit_combiner, require_term_sets
from service.combine import CombinerManifest, ComponentRef, LlmRef, reads_llm


def manifest(weights: list[float], intercept: float = 0.1, n: int = 2000) -> CombinerManifest:
    return CombinerManifest.new(name="c", dataset="d", data_fingerprint="f", crm=ComponentRef(name="crm", version="1"),
                                llm=LlmRef(mode="shared", name="a", version="2"), terms=["llm", "crm"],
                                weights=weights, intercept=intercept, n_fit=n,
                                fitted_on={"split": "valid", "seed": 2, "n": n}, validation={})


def test_a_refit_from_another_cpu_s_scores_is_the_same_fit():
    # another CPU's fp32 kernels scored ML-1M's 2,000 fit prompts ~1e-5 apart: the coefficients moved ~1e-6
    assert _same_fit(manifest([-0.2012345, 1.1534567]), manifest([-0.2012351, 1.1534559], intercept=0.1000004))


def test_other_coefficients_or_other_samples_are_another_fit():
    assert not _same_fit(manifest([-0.20, 1.15]), manifest([-0.25, 1.15]))
    assert not _same_fit(manifest([-0.20, 1.15]), manifest([-0.20, 1.15], intercept=0.2))
    assert not _same_fit(manifest([-0.20, 1.15]), manifest([-0.20, 1.15], n=1000))


def rows(llm_signal: float, n: int = 2000, seed: int = 0) -> FitRows:
    """Labels from two independent signals: the CRM sees one, the LLM `llm_signal` of the other (0: noise)."""
    rng = np.random.default_rng(seed)
    seen, unseen = rng.normal(size=n), rng.normal(size=n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(1.5 * seen + 1.5 * unseen)))).astype(int)
    crm = seen + 0.3 * rng.normal(size=n)
    llm = llm_signal * unseen + rng.normal(size=n)
    counts = rng.integers(0, 500, size=(n, 2)).astype(float)
    return FitRows(labels, llm, crm, counts, ["u_n", "i_n"])


def test_an_llm_that_knows_what_the_crm_misses_enters_the_combiner():
    stacking, report = fit_combiner(rows(llm_signal=2.0))
    assert report["chosen"] != "crm" and "llm" in stacking.terms
    assert report["hybrid"]["auc"] > report["term_sets"]["crm"]["auc"] + 0.05
    assert stacking.weights[stacking.terms.index("llm")] > 0


def test_an_llm_that_adds_nothing_leaves_the_crm_alone():
    stacking, report = fit_combiner(rows(llm_signal=0.0))
    assert report["chosen"] == "crm" and stacking.terms == ("crm",)
    assert set(report["term_sets"]) == set(TERM_SETS)  # every candidate measured, the LLM's too
    assert not reads_llm(stacking.terms)


def test_the_candidates_can_be_narrowed_and_must_exist():
    _, report = fit_combiner(rows(llm_signal=0.0), term_sets=("stack", "stack-counts"))
    assert report["chosen"] in ("stack", "stack-counts") and set(report["term_sets"]) == {"stack", "stack-counts"}
    with pytest.raises(ValueError, match="magic"):
        fit_combiner(rows(llm_signal=0.0), term_sets=("crm", "magic"))
    with pytest.raises(ValueError, match="none"):
        require_term_sets(())
