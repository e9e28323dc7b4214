"""Stage 8, combine: the served score from the LLM's and the CRM's, and which scorer answers a request.

Scorers: `hybrid` (both, through a combiner), `crm` (the CRM alone), `llm` (the LLM alone). A
request asks for one (`options.scorer`, default `LOREC_SCORER`); when it cannot be had the next in
its chain answers and `fallbacks` says why: hybrid -> crm -> llm, crm -> llm. (The CRM comes
before the LLM alone: it is the stronger of the two here and costs milliseconds.)

A combiner is logistic stacking fitted on validation samples only (`lorec train combiner`): a
weighted sum of terms built from the LLM's logit (log P(Yes) - log P(No)), the CRM's logit and
the user's and the item's interaction counts (so a cold item can lean on the LLM). The fit may find that
the LLM earns no place: no term set with it beats the CRM alone on validation. Then the combiner's one
term is the CRM's logit (recalibrated), and the hybrid calls no engine: it answers in milliseconds what
the engine's seconds would not improve, and a re-fit for a stronger adapter brings the LLM back. Its artifact,
`data_dir/combiners/<name>/manifest.json`, names the CRM and the LLM it was fitted for, by name
and version: at start a combiner whose components are not the ones configured is refused (the
service starts on the next scorer and says so in `GET /v1/adapters` and in `fallbacks`), and a
request routed to another LLM than the combiner's (another adapter, a fallback to the base model)
is answered by the CRM, never by a combination the combiner was not fitted for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel

from service.artifacts import ArtifactError, DataPaths, Manifest
from service.config import Settings
from service.records import AdapterMode, Scorer
from service.routing import AdapterNotFound, AdapterRegistry

SCORER_CHAIN: dict[str, tuple[Scorer, ...]] = {"hybrid": ("hybrid", "crm", "llm"), "crm": ("crm", "llm"),
                                               "llm": ("llm",)}
# What a term may be built from: the two logits and log(1 + interactions before t).
BASES = ("llm", "crm", "log_u_n", "log_i_n")
COUNT_FEATURES = {"log_u_n": "u_n", "log_i_n": "i_n"}


class ComponentRef(BaseModel):
    name: str
    version: str


class LlmRef(BaseModel):
    """The LLM a combiner was fitted for: the adapter mode that served its samples and what it names."""

    mode: AdapterMode | Literal["named"]
    name: str  # adapter name, RecLoRA bank name, or "base"
    version: str  # adapter or bank content hash, or the base model's folder name


class CombinerManifest(Manifest):
    FORMAT = "lorec.combiner"
    VERSION = 1

    name: str
    dataset: str
    data_fingerprint: str
    crm: ComponentRef
    llm: LlmRef
    terms: list[str]
    weights: list[float]
    intercept: float
    n_fit: int
    fitted_on: dict  # split, seed, n: which samples (validation only)
    validation: dict  # cross-validated figures on those samples: hybrid, llm, crm
    command: str | None = None


def combiner_dir(data_dir: Path, name: str) -> Path:
    return DataPaths(data_dir).combiner(name)


def llm_logit(p_yes: float) -> float:
    p = min(max(p_yes, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def term_values(terms: Sequence[str], bases: dict[str, np.ndarray]) -> np.ndarray:
    """(rows, terms): a term is one base or a product of bases joined by '*', e.g. 'llm*log_i_n'."""
    rows = len(bases["crm"])
    columns = []
    for term in terms:
        column = np.ones(rows)
        for base in term.split("*"):
            if base not in bases:
                raise ArtifactError(f"combiner term {term!r}: unknown input {base!r} (known: {', '.join(BASES)})")
            column = column * bases[base]
        columns.append(column)
    return np.stack(columns, axis=1) if columns else np.zeros((rows, 0))


def bases_of(llm: np.ndarray | None, crm: np.ndarray, features: np.ndarray, feature_names: Sequence[str]
             ) -> dict[str, np.ndarray]:
    """The terms' inputs; without `llm` (a combiner with no LLM term) a term that reads it is refused."""
    index = {name: i for i, name in enumerate(feature_names)}
    counts = {base: np.log1p(np.maximum(features[:, index[name]], 0.0)) for base, name in COUNT_FEATURES.items()}
    llm_base = {} if llm is None else {"llm": np.asarray(llm, np.float64)}
    return {**llm_base, "crm": np.asarray(crm, np.float64), **counts}


def reads_llm(terms: Sequence[str]) -> bool:
    return any("llm" in term.split("*") for term in terms)


class Combiner:
    def __init__(self, folder: Path) -> None:
        self.manifest = CombinerManifest.load(folder)
        m = self.manifest
        if len(m.weights) != len(m.terms):
            raise ArtifactError(f"{folder}: {len(m.terms)} terms but {len(m.weights)} weights")
        term_values(m.terms, {b: np.zeros(1) for b in BASES})  # every term's inputs are known

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def uses_llm(self) -> bool:
        """False when the fit kept the CRM alone: the hybrid then calls no engine."""
        return reads_llm(self.manifest.terms)

    def logits(self, llm: np.ndarray | None, crm: np.ndarray, features: np.ndarray, feature_names: Sequence[str]
               ) -> np.ndarray:
        values = term_values(self.manifest.terms, bases_of(llm, crm, features, feature_names))
        return values @ np.asarray(self.manifest.weights) + self.manifest.intercept

    def fits_route(self, mode: str, adapter: str | None) -> str | None:
        """Why a request routed to (mode, adapter) cannot be combined; None when it can."""
        llm = self.manifest.llm
        if llm.mode in ("personal", "cohort"):
            ok = mode == llm.mode
        else:
            ok = (adapter or "base") == llm.name and mode not in ("personal", "cohort")
        if ok:
            return None
        return (f"combiner {self.name!r} was fitted for {llm.mode} LLM {llm.name!r}; this request was routed to "
                f"{mode} {adapter or 'base'!r}")


@dataclass
class ScorerChoice:
    scorer: Scorer
    fallbacks: list[dict] = field(default_factory=list)


class Scorers:
    """Which scorers this deployment can serve, and why not the others."""

    def __init__(self, default: Scorer, has_crm: bool, combiner: Combiner | None, unavailable: dict[str, str]
                 ) -> None:
        self.default = default
        self.combiner = combiner
        self.unavailable = dict(unavailable)
        if not has_crm:
            self.unavailable.setdefault("crm", "no CRM configured (LOREC_CRM)")
            self.unavailable.setdefault("hybrid", "no CRM configured (LOREC_CRM)")
        if combiner is None:
            self.unavailable.setdefault("hybrid", "no combiner configured (LOREC_COMBINER)")

    def choose(self, requested: Scorer | None) -> ScorerChoice:
        skipped = []
        for scorer in SCORER_CHAIN[requested or self.default]:
            if scorer not in self.unavailable:
                return ScorerChoice(scorer, skipped)
            skipped.append({"mode": scorer, "reason": self.unavailable[scorer]})
        raise AssertionError("the LLM alone is always available")  # pragma: no cover

    @property
    def serving(self) -> Scorer:
        return self.choose(None).scorer


def llm_serving(mode: str, name: str, settings: Settings, registry: AdapterRegistry, personalizer) -> LlmRef | None:
    """What the LLM of adapter mode `mode` (and adapter `name`, for named adapters) is here now."""
    try:
        if mode == "base":
            return LlmRef(mode="base", name="base", version=settings.model_dir.name)
        if mode in ("personal", "cohort"):
            bank = personalizer.bank if personalizer else None
            return LlmRef(mode=mode, name=bank.name, version=bank.version) if bank else None
        adapter = settings.adapters.default if mode == "shared" else name
        return LlmRef(mode=mode, name=adapter, version=registry.version(adapter)) if adapter else None
    except AdapterNotFound:
        return None


def open_combiner(data_dir: Path, name: str | None) -> Combiner | None:
    return Combiner(combiner_dir(data_dir, name)) if name else None


def refusal(combiner: Combiner, crm: ComponentRef | None, llm: LlmRef | None) -> str | None:
    """Why `combiner` cannot combine this deployment's CRM and LLM (None: it can). `llm` is what the
    combiner's adapter mode serves here now, `crm` the configured CRM."""
    m = combiner.manifest
    if crm is None or (crm.name, crm.version) != (m.crm.name, m.crm.version):
        have = f"{crm.name}@{crm.version}" if crm else "none"
        return f"combiner {m.name!r} was fitted for CRM {m.crm.name}@{m.crm.version}; configured: {have}"
    if llm != m.llm:
        have = f"{llm.mode} {llm.name}@{llm.version}" if llm else f"no {m.llm.mode} LLM"
        return (f"combiner {m.name!r} was fitted for {m.llm.mode} LLM {m.llm.name}@{m.llm.version}; "
                f"configured: {have}")
    return None
