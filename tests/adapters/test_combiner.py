"""The combiner artifact's identity: a re-fit on the same samples keeps the artifact, another fit is refused."""

from __future__ import annotations

from adapters.combiner import _same_fit
from service.combine import CombinerManifest, ComponentRef, LlmRef


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
