"""Fitting the combiner (service/combine.py) on validation samples only, scored through the gateway.

`lorec train combiner` draws a seeded slice of the validation split, asks the running gateway for
each sample at its own `as_of` (scorer llm, explain: the LLM's and the CRM's scores side by side),
reads the samples' interaction counts from the offline features (equal to the gateway's), and fits
logistic stacking. The gateway's CRM scores must equal the CRM's on the data's files, sample for sample, or
the fit is refused: a store that holds writes dated inside the data's time would fit the combiner to other
features than the trainer's and the test's. Which terms enter is chosen by cross-validation on those
samples; the test split is never read (`require_validation` refuses any other sample). The CRM alone (its
logit recalibrated) is one of the candidates, and the first: the LLM enters only where a term set with it
beats the CRM alone, and otherwise the hybrid calls no engine (service/combine.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from adapters.features import OfflineFeatures
from adapters.figures import crm_agreement, require_crm_agreement
from adapters.gateway_scores import score_via_gateway
from adapters.journal import open_journal
from adapters.offline import Dataset
from adapters.records import recorded_command
from adapters.samples import Sample, draw
from adapters.train import metrics
from service.auth import client_key
from service.combine import CombinerManifest, ComponentRef, bases_of, combiner_dir, llm_logit, llm_serving, term_values
from service.config import Settings
from service.crm import Crm, crm_dir
from service.ingest import require_store_holds
from service.personalize import open_personalizer
from service.routing import AdapterRegistry

# Candidate term sets, simplest first; cross-validation on the validation samples picks one (a tie: the
# simpler, so the LLM must beat the CRM alone to enter).
TERM_SETS: dict[str, tuple[str, ...]] = {
    "crm": ("crm",),
    "stack": ("llm", "crm"),
    "stack-counts": ("llm", "crm", "log_u_n", "log_i_n", "llm*log_u_n", "llm*log_i_n"),
    "stack-counts-crm": ("llm", "crm", "log_u_n", "log_i_n", "llm*log_u_n", "llm*log_i_n", "crm*log_u_n",
                         "crm*log_i_n"),
}
FOLDS = 5


class NotValidation(ValueError):
    """A sample outside the validation split reached the combiner's fit."""


def require_validation(samples: Sequence[Sample], valid: Sequence[Sample]) -> None:
    allowed = {(s.user_id, s.item_id, s.ts) for s in valid}
    strays = [s for s in samples if (s.user_id, s.item_id, s.ts) not in allowed]
    if strays:
        s = strays[0]
        raise NotValidation(f"{len(strays)} of {len(samples)} samples are not validation samples (e.g. user "
                            f"{s.user_id}, item {s.item_id}, ts {s.ts}): a combiner is fitted on validation only")


@dataclass
class FitRows:
    labels: np.ndarray
    llm: np.ndarray  # logits
    crm: np.ndarray  # logits
    features: np.ndarray
    feature_names: Sequence[str]

    @classmethod
    def of(cls, labels: Sequence[int], llm_p: Sequence[float], crm_p: Sequence[float], features: np.ndarray,
           feature_names: Sequence[str]) -> FitRows:
        return cls(np.asarray(labels), np.array([llm_logit(p) for p in llm_p]),
                   np.array([llm_logit(p) for p in crm_p]), features, feature_names)

    def terms(self, names: Sequence[str]) -> np.ndarray:
        return term_values(names, bases_of(self.llm, self.crm, self.features, self.feature_names))


@dataclass
class Stacking:
    terms: tuple[str, ...]
    weights: list[float]
    intercept: float


def fit_stacking(x: np.ndarray, y: np.ndarray, terms: Sequence[str]) -> Stacking:
    """Logistic regression on standardized terms (light L2), folded back to raw-term weights."""
    center, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    model = LogisticRegression(C=1.0, max_iter=1000).fit((x - center) / scale, y)
    weights = model.coef_[0] / scale
    return Stacking(tuple(terms), weights.tolist(), float(model.intercept_[0] - (weights * center).sum()))


def predict(stacking: Stacking, x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(x @ np.asarray(stacking.weights) + stacking.intercept)))


def cross_validated(rows: FitRows, terms: Sequence[str], seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities of stacking on `terms`."""
    x, out = rows.terms(terms), np.zeros(len(rows.labels))
    for train, held in StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(x, rows.labels):
        out[held] = predict(fit_stacking(x[train], rows.labels[train], terms), x[held])
    return out


def require_term_sets(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in TERM_SETS]
    if unknown or not names:
        raise ValueError(f"term sets {', '.join(unknown) or '(none)'}: choose among {', '.join(TERM_SETS)}")


def fit_combiner(rows: FitRows, seed: int = 0, term_sets: Sequence[str] = tuple(TERM_SETS)
                 ) -> tuple[Stacking, dict]:
    """Of `term_sets` (names in TERM_SETS), the one with the best cross-validated AUC (the earlier on a tie),
    refitted on all rows; the figures behind the choice."""
    require_term_sets(term_sets)
    labels = rows.labels.tolist()
    report = {"llm": metrics(labels, 1 / (1 + np.exp(-rows.llm))), "crm": metrics(labels, 1 / (1 + np.exp(-rows.crm))),
              "term_sets": {}}
    for name in term_sets:
        report["term_sets"][name] = metrics(labels, cross_validated(rows, TERM_SETS[name], seed))
    chosen = max(term_sets, key=lambda name: report["term_sets"][name]["auc"])
    report["chosen"] = chosen
    report["hybrid"] = report["term_sets"][chosen]
    return fit_stacking(rows.terms(TERM_SETS[chosen]), rows.labels, TERM_SETS[chosen]), report


def fit_from_gateway(settings: Settings, directory: Path, gateway: str, n: int, seed: int, k: int, retrieval: str,
                     name: str | None, journal_dir: Path | None, concurrency: int = 8,
                     term_sets: Sequence[str] = tuple(TERM_SETS)) -> tuple[Path, CombinerManifest]:
    """`lorec train combiner`: score a seeded validation slice through the gateway (the LLM the deployment
    serves by default, the configured CRM), fit, and save the combiner artifact naming both."""
    require_term_sets(term_sets)  # before minutes of scoring
    if not settings.scoring.crm:
        raise ValueError("set LOREC_CRM to the CRM the gateway serves")
    crm = Crm(crm_dir(settings.data_dir, settings.scoring.crm))
    llm = llm_serving(settings.adapters.mode, settings.adapters.default or "base", settings,
                      AdapterRegistry(settings.registry_dir), open_personalizer(settings))
    if llm is None:
        raise ValueError(f"no {settings.adapters.mode} LLM configured to fit a combiner for")
    dataset = Dataset.read(directory)
    asyncio.run(require_store_holds(settings, dataset.data.name))
    samples = draw(dataset.parts["valid"], n, seed)
    require_validation(samples, dataset.parts["valid"])
    journal = open_journal(journal_dir, samples, None, dataset=dataset.name, split="valid", n=n, seed=seed,
                           adapter=None, mode=settings.adapters.mode, k=k, retrieval=retrieval,
                           method=f"combiner-fit-{llm.name}-{crm.name}") if journal_dir else None
    served = asyncio.run(score_via_gateway(gateway, samples, None, k, retrieval, concurrency,
                                           api_key=client_key(settings), journal=journal, scorer="llm"))
    if served.adapters != {llm.mode: len(samples)}:  # a fallback mixed another LLM into the samples
        raise RuntimeError(f"the gateway answered with adapter modes {served.adapters}, not {llm.mode} throughout")
    matrix = OfflineFeatures(dataset.data, crm.spec).matrix(samples)
    served_crm = [c["crm"] for c in served.components]
    require_crm_agreement(crm_agreement(samples, served_crm, crm.logits(matrix)))
    rows = FitRows.of([s.label for s in samples], [c["llm"] for c in served.components], served_crm, matrix,
                      crm.spec.names)
    stacking, report = fit_combiner(rows, seed, term_sets)
    default_name = f"combiner-{dataset.name}-{crm.version[:6]}-{llm.version[:6]}-{report['chosen']}"
    manifest = CombinerManifest.new(
        name=name or default_name, dataset=dataset.name,
        data_fingerprint=dataset.data.fingerprint, crm=ComponentRef(name=crm.name, version=crm.version), llm=llm,
        terms=list(stacking.terms), weights=stacking.weights, intercept=stacking.intercept, n_fit=len(samples),
        fitted_on={"split": "valid", "seed": seed, "n": len(samples), "k": k, "retrieval": retrieval},
        validation=report, command=recorded_command())
    folder = combiner_dir(settings.data_dir, manifest.name)
    if folder.exists():
        existing = CombinerManifest.load(folder)
        if _same_fit(existing, manifest):  # a re-run on the same samples: the artifact stands
            return folder, existing
        raise FileExistsError(f"combiner {manifest.name!r} exists with another fit: a new version needs a new name")
    manifest.save(folder)
    return folder, manifest


def _same_fit(a: CombinerManifest, b: CombinerManifest) -> bool:
    """Same components, data and samples, and the same coefficients up to float noise: another CPU's kernels
    score the same prompts ~1e-5 apart (measured on ML-1M across two machines), which moves the fit ~1e-6."""
    fields = ("crm", "llm", "data_fingerprint", "terms", "fitted_on")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and np.allclose(
        [*a.weights, a.intercept], [*b.weights, b.intercept], rtol=1e-3, atol=1e-4)
