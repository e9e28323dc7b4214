"""The request flow, one stage after the other:

history (Redis) -> features (Redis) -> crm -> retrieval (Qdrant) -> routing (adapter)
-> prompt -> scoring (vLLM) -> combine.

(The features' one Redis read, the candidates' statistics, needs only the request: it is sent right
behind the history's, and its reply is there when the features stage starts.)

Routes only translate HTTP; this object does the work and knows nothing of HTTP
beyond raising `ApiError` for what the caller got wrong.

Which scorer answers (hybrid, crm, llm: combine.py) is chosen first; the stages a
scorer does not need are skipped (the CRM alone, or a hybrid whose combiner kept
the CRM alone, reads no Qdrant and calls no engine). Features and the CRM's
scores are computed whenever a CRM is configured: the answer, `explain`, a
RecLoRA gate or the adapter's prompt (the CRM's estimate) may read them, and they
cost milliseconds beside the engine's seconds. Routing comes before the prompt,
since the routed adapter says which prompt it reads.

Faults of a dependency other than Redis degrade the answer instead of failing it,
and the result says so in `degraded`: Qdrant failing or slower than its timeout ->
`recent` history ("retrieval"); the engine unreachable, erroring or past the
request's deadline -> the CRM's scores when one is configured ("llm"). Without
Redis there is no history to score from: that stays an error (503).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field

import httpx
import numpy as np
from qdrant_client.http.exceptions import ApiException as QdrantApiError
from qdrant_client.http.exceptions import ResponseHandlingException as QdrantTransportError

from service.combine import ScorerChoice, Scorers, llm_logit
from service.config import RequestSettings
from service.crm import Crm
from service.errors import ApiError
from service.features import FeatureReader, StatsRead
from service.history import HistoryStore
from service.metrics import Metrics
from service.prompt import PromptCodec, PromptTooLong, encode_within_budget
from service.records import AdapterMode, Behaviour, Item, RetrievalMode, RouteMode, Scorer, UserContext
from service.retrieval import ItemIndex, select_behaviours
from service.routing import Route, Router
from service.scoring import AdapterLoadFailed, AnswerLogprobs, EngineError, EnginePool

log = logging.getLogger(__name__)
RETRIEVAL_FAULTS = (TimeoutError, QdrantApiError, QdrantTransportError, httpx.HTTPError, OSError)


@dataclass
class ScoreQuery:
    user_id: str
    item_ids: list[str]
    as_of: int | None = None
    adapter: str | None = None
    mode: AdapterMode | None = None
    retrieval: RetrievalMode | None = None
    k: int | None = None
    skip_unknown: bool = False
    scorer: Scorer | None = None
    explain: bool = False


@dataclass
class Scored:
    item_id: str
    score: float  # the served probability
    llm: AnswerLogprobs | None  # the LLM's answer, when the LLM scored
    crm: float | None  # the CRM's probability, when the CRM scored
    behaviours: list[Behaviour]
    prompt: list[int]


@dataclass
class ScoreResult:
    user_id: str
    adapter: str
    adapter_mode: RouteMode
    retrieval: RetrievalMode
    k: int
    history_size: int
    scored: list[Scored]
    catalog: dict[str, Item]
    scorer: Scorer = "llm"
    combiner: str | None = None
    fallbacks: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    """What one request may cost: candidates, prompt tokens, time."""
    max_candidates: int
    max_prompt_tokens: int
    deadline_s: float
    retrieval_timeout_s: float

    @classmethod
    def of(cls, requests: RequestSettings, prompt_budget: int) -> Limits:
        return cls(requests.max_candidates, prompt_budget, requests.request_deadline_s, requests.retrieval_timeout_s)


@dataclass
class LlmOutcome:
    """What the LLM stages produced: the route, and answers unless the route or the engine failed."""
    route: Route
    answers: list[AnswerLogprobs] | None
    chosen: dict[str, list[Behaviour]]
    prompts: list[list[int]]
    catalog: dict[str, Item]  # the items the prompts show
    fallback: dict | None = None  # why the LLM's answers cannot be used (hybrid on another route)


@dataclass
class CrmScores:
    features: np.ndarray  # (targets, features)
    logits: np.ndarray


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


class RecommendService:
    def __init__(self, history: HistoryStore, index: ItemIndex, codec: PromptCodec, engine: EnginePool,
                 router: Router, metrics: Metrics, *, default_k: int, default_mode: RetrievalMode, limits: Limits,
                 scorers: Scorers, crm: Crm | None = None, features: FeatureReader | None = None) -> None:
        self.history = history
        self.index = index
        self.codec = codec
        self.engine = engine
        self.router = router
        self.metrics = metrics
        self.default_k = default_k
        self.default_mode = default_mode
        self.limits = limits
        self.scorers = scorers
        self.crm = crm
        self.features = features

    async def score(self, query: ScoreQuery) -> ScoreResult:
        deadline = time.monotonic() + self.limits.deadline_s
        if len(query.item_ids) > self.limits.max_candidates:
            raise ApiError(422, "invalid_request", f"at most {self.limits.max_candidates} item_ids per request",
                           field="item_ids")
        k = self.default_k if query.k is None else query.k
        mode = query.retrieval or self.default_mode
        timings: dict[str, float] = {}
        degraded: list[str] = []
        choice = self.scorers.choose(query.scorer)

        async with self._stats_read(query) as stats:
            with self.metrics.stage("history", timings):
                context, candidates = await self.history.load_request(query.user_id, query.item_ids, query.as_of)
            targets, skipped = self._known_targets(query, candidates)
            items = [candidates[t] for t in targets]
            crm = await self._crm_scores(context, items, stats, timings)
        llm = await self._llm_scores(context, query, targets, candidates, k, mode, deadline, timings, degraded,
                                     choice, crm) if self._needs_llm(choice.scorer) and targets else None
        if llm is not None and llm.answers is None and choice.scorer != "crm":  # the CRM stands in
            choice = ScorerChoice("crm", choice.fallbacks + ([llm.fallback] if llm.fallback else []))
        scores, combiner = self._served(choice.scorer, llm, crm, timings)
        route = llm.route if llm is not None else Route(adapter=None, mode="none")
        no_llm = choice.scorer == "crm" or llm is None  # the CRM stood in, or no LLM stage ran
        adapter, adapter_mode = (f"crm:{self.crm.name}", "crm") if no_llm and targets \
            else (route.label, route.mode)
        fallbacks = choice.fallbacks + route.fallbacks
        self.metrics.answers.labels(choice.scorer, adapter_mode).inc(len(targets))
        for step in fallbacks:
            self.metrics.fallbacks.labels(step["mode"]).inc()
        return ScoreResult(user_id=query.user_id, adapter=adapter, adapter_mode=adapter_mode, retrieval=mode,
                           k=k, history_size=len(context.timeline),
                           scored=self._scored(targets, scores, llm, crm),
                           catalog={**(llm.catalog if llm else {}), **{i: c for i, c in candidates.items() if c}},
                           scorer=choice.scorer, combiner=combiner, fallbacks=fallbacks,
                           timings=timings, degraded=degraded, skipped=skipped)

    def _needs_llm(self, scorer: Scorer) -> bool:
        """The CRM alone calls no engine, nor does a hybrid whose combiner kept the CRM alone."""
        return scorer == "llm" or (scorer == "hybrid" and self.scorers.combiner.uses_llm)

    @staticmethod
    def _scored(targets: list[str], scores: np.ndarray, llm: LlmOutcome | None, crm: CrmScores | None
                ) -> list[Scored]:
        """Per target: the served score and each component's (for `explain`)."""
        answers = llm.answers if llm is not None and llm.answers is not None else [None] * len(targets)
        crm_p = [sigmoid(float(c)) for c in crm.logits] if crm is not None else [None] * len(targets)
        chosen = llm.chosen if llm is not None else {}
        prompts = llm.prompts if llm is not None else [[] for _ in targets]
        return [Scored(t, float(p), a, c, chosen.get(t, []), prompt)
                for t, p, a, c, prompt in zip(targets, scores, answers, crm_p, prompts)]

    def _stats_read(self, query: ScoreQuery) -> AbstractAsyncContextManager[StatsRead | None]:
        """The features' item statistics, read behind the history's read (they need only the ids and as_of):
        their round trip overlaps the history's instead of following it (features.py)."""
        if self.crm is None or self.features is None:
            return nullcontext()
        return self.features.stats_read(query.item_ids, query.as_of, behind=True)

    async def _crm_scores(self, context: UserContext, items: list[Item], stats: StatsRead | None,
                          timings: dict[str, float]) -> CrmScores | None:
        """The features of the candidates and the CRM's logits on them (None without a CRM)."""
        if self.crm is None or self.features is None or stats is None:
            return None
        with self.metrics.stage("features", timings):
            features = await self.features.read(context, items, stats)
        context.user_features = features.user  # what a bank gated on the feature CRM reads (routing)
        with self.metrics.stage("crm", timings):
            logits = self.crm.logits(features.rows)
        return CrmScores(features.rows, logits)

    def _served(self, scorer: Scorer, llm: LlmOutcome | None, crm: CrmScores | None,
                timings: dict[str, float]) -> tuple[np.ndarray, str | None]:
        """The served probabilities, and the combiner's name when one combined them."""
        if scorer == "crm":
            return np.array([sigmoid(float(c)) for c in crm.logits]) if crm is not None else np.zeros(0), None
        answers = llm.answers if llm is not None and llm.answers is not None else []
        combiner = self.scorers.combiner
        if scorer == "llm" or (combiner.uses_llm and not answers):
            return np.array([a.p_yes for a in answers]), None
        with self.metrics.stage("combine", timings):
            logits = combiner.logits(np.array([llm_logit(a.p_yes) for a in answers]) if combiner.uses_llm else None,
                                     crm.logits, crm.features, self.crm.spec.names)
        return np.array([sigmoid(float(x)) for x in logits]), combiner.name

    @staticmethod
    def _known_targets(query: ScoreQuery, candidates: dict[str, Item | None]) -> tuple[list[str], list[str]]:
        unknown = [i for i, item in candidates.items() if item is None]
        if unknown and not query.skip_unknown:
            raise ApiError(404, "unknown_items", f"unknown item ids: {', '.join(unknown[:20])}",
                           field="item_ids", details=[{"item_id": i} for i in unknown])
        return [i for i in query.item_ids if candidates[i] is not None], unknown

    async def _retrieve(self, context: UserContext, targets: list[str], k: int, mode: RetrievalMode,
                        degraded: list[str]) -> dict[str, list[Behaviour]]:
        if mode == "recent" or not targets:
            return await select_behaviours(self.index, context.behaviours, targets, k, "recent")
        try:
            async with asyncio.timeout(self.limits.retrieval_timeout_s):
                return await select_behaviours(self.index, context.behaviours, targets, k, mode)
        except RETRIEVAL_FAULTS as exc:
            log.warning("retrieval degraded to recent history: %s", exc.__class__.__name__)
            self._degrade("retrieval", degraded)
            return await select_behaviours(self.index, context.behaviours, targets, k, "recent")

    def _prompts(self, context: UserContext, chosen: dict[str, list[Behaviour]], known: dict[str, Item],
                 candidates: dict[str, Item | None], targets: list[str], crm_logits: np.ndarray | None
                 ) -> tuple[list[list[int]], dict[str, list[Behaviour]]]:
        """Token ids per target within the token budget, and the behaviours each prompt shows; with
        `crm_logits` (an adapter trained on them) each prompt shows its target's CRM estimate."""
        prompts, shown = [], {}
        for i, t in enumerate(targets):
            # A behaviour whose item left the catalog cannot be described; it is left out.
            picks = [b for b in chosen[t] if b.item_id in known]
            try:
                ids, shown[t] = encode_within_budget(self.codec, context.profile, picks, known, candidates[t],
                                                     self.limits.max_prompt_tokens,
                                                     None if crm_logits is None else float(crm_logits[i]))
            except PromptTooLong as exc:
                raise ApiError(422, "prompt_too_long", str(exc), field="item_ids") from None
            prompts.append(ids)
        return prompts, shown

    async def _llm_scores(self, context: UserContext, query: ScoreQuery, targets: list[str],
                          candidates: dict[str, Item | None], k: int, mode: RetrievalMode, deadline: float,
                          timings: dict[str, float], degraded: list[str], choice: ScorerChoice,
                          crm: CrmScores | None) -> LlmOutcome:
        """Retrieval, routing, prompts and the engine within the deadline. When the engine fails and a CRM
        can stand in, or a hybrid request is routed to an LLM its combiner was not fitted for, the outcome
        has no answers (and the CRM answers instead)."""
        with self.metrics.stage("retrieval", timings):
            chosen = await self._retrieve(context, targets, k, mode, degraded)
        with self.metrics.stage("catalog", timings):
            catalog = await self.history.items({b.item_id for picks in chosen.values() for b in picks})
        known = {i: item for i, item in catalog.items() if item is not None}
        outcome = LlmOutcome(Route(adapter=None), None, {}, [[] for _ in targets], known)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                with self.metrics.stage("routing", timings):
                    outcome.route = await self.router.route(context, query.adapter, query.mode)
                # The router admits an adapter that reads the CRM's estimate only when this gateway serves
                # that CRM, so its logits are here.
                shows_crm = outcome.route.prompt_crm is not None
                with self.metrics.stage("prompt", timings):
                    outcome.prompts, outcome.chosen = self._prompts(context, chosen, known, candidates, targets,
                                                                    crm.logits if shows_crm else None)
                if choice.scorer == "hybrid" and self.crm is not None:
                    reason = self.scorers.combiner.fits_route(outcome.route.mode, outcome.route.adapter)
                    if reason is not None:  # do not spend the engine on answers that cannot be combined
                        outcome.fallback = {"mode": "hybrid", "reason": reason}
                        return outcome
                with self.metrics.stage("engine", timings):
                    outcome.answers = await self.engine.score(outcome.prompts, outcome.route.adapter,
                                                              affinity=context.user_id)
        except (EngineError, TimeoutError) as exc:
            if isinstance(exc, AdapterLoadFailed):  # a named adapter the engine refuses: the caller's choice
                raise
            self.metrics.engine_calls.labels(outcome.route.label, "error").inc()
            if isinstance(exc, TimeoutError):
                exc = EngineError(f"engine past the request deadline of {self.limits.deadline_s:g} s", timeout=True)
            if self.crm is None:
                raise exc from None
            log.warning("LLM degraded to the CRM: %s", exc)
            self._degrade("llm", degraded)
            return outcome
        self.metrics.engine_calls.labels(outcome.route.label, "ok").inc()
        self.metrics.engine_prompts.inc(len(outcome.prompts))
        return outcome

    def _degrade(self, part: str, degraded: list[str]) -> None:
        degraded.append(part)
        self.metrics.degraded.labels(part).inc()

    async def rank(self, query: ScoreQuery, top_k: int | None) -> ScoreResult:
        result = await self.score(query)
        # Stable sort: equal scores keep the request's order.
        result.scored = sorted(result.scored, key=lambda s: -s.score)[:top_k]
        return result
