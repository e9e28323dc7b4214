"""The request flow, one stage after the other:

history (Redis) -> retrieval (Qdrant) -> prompt -> routing (adapter) -> scoring (vLLM).

Routes only translate HTTP; this object does the work and knows nothing of HTTP
beyond raising `ApiError` for what the caller got wrong.

Faults of a dependency other than Redis degrade the answer instead of failing it,
and the result says so in `degraded`: Qdrant failing or slower than its timeout ->
`recent` history ("retrieval"); the engine unreachable, erroring or past the
request's deadline -> the CRM's scores when one is configured ("llm"). Without
Redis there is no history to score from: that stays an error (503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx
from qdrant_client.http.exceptions import ApiException as QdrantApiError
from qdrant_client.http.exceptions import ResponseHandlingException as QdrantTransportError

from service.crm import CrmScorer
from service.errors import ApiError
from service.history import HistoryStore
from service.metrics import Metrics
from service.prompt import PromptCodec, PromptTooLong, encode_within_budget
from service.records import Behaviour, Item, UserContext
from service.retrieval import ItemIndex, Mode, select_behaviours
from service.routing import Mode as AdapterMode
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
    retrieval: Mode | None = None
    k: int | None = None
    skip_unknown: bool = False


@dataclass
class Scored:
    item_id: str
    answer: AnswerLogprobs
    behaviours: list[Behaviour]
    prompt: list[int]


@dataclass
class ScoreResult:
    user_id: str
    adapter: str
    adapter_mode: str
    retrieval: Mode
    k: int
    history_size: int
    scored: list[Scored]
    catalog: dict[str, Item]
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


class RecommendService:
    def __init__(self, history: HistoryStore, index: ItemIndex, codec: PromptCodec, engine: EnginePool,
                 router: Router, metrics: Metrics, *, default_k: int, default_mode: Mode, limits: Limits,
                 crm: CrmScorer | None = None) -> None:
        self.history = history
        self.index = index
        self.codec = codec
        self.engine = engine
        self.router = router
        self.metrics = metrics
        self.default_k = default_k
        self.default_mode = default_mode
        self.limits = limits
        self.crm = crm

    async def score(self, query: ScoreQuery) -> ScoreResult:
        deadline = time.monotonic() + self.limits.deadline_s
        if len(query.item_ids) > self.limits.max_candidates:
            raise ApiError(422, "invalid_request", f"at most {self.limits.max_candidates} item_ids per request",
                           field="item_ids")
        k = self.default_k if query.k is None else query.k
        mode = query.retrieval or self.default_mode
        timings: dict[str, float] = {}
        degraded: list[str] = []
        stage = self.metrics.stage

        with stage("history", timings):
            context, candidates = await self.history.load_request(query.user_id, query.item_ids, query.as_of)
        targets, skipped = self._known_targets(query, candidates)
        with stage("retrieval", timings):
            chosen = await self._retrieve(context, targets, k, mode, degraded)
        with stage("catalog", timings):
            catalog = await self.history.items({b.item_id for picks in chosen.values() for b in picks})
        known = {i: item for i, item in catalog.items() if item is not None}
        with stage("prompt", timings):
            prompts, chosen = self._prompts(context, chosen, known, candidates, targets)
        route, answers = await self._llm_scores(context, query, targets, prompts, deadline, timings, degraded) \
            if targets else (Route(adapter=None, mode="none"), [])
        scored = [Scored(t, a, chosen[t], p) for t, a, p in zip(targets, answers, prompts)]
        return ScoreResult(user_id=query.user_id, adapter=route.label, adapter_mode=route.mode, retrieval=mode,
                           k=k, history_size=len(context.behaviours), scored=scored, fallbacks=route.fallbacks,
                           catalog={**known, **{i: c for i, c in candidates.items() if c}}, timings=timings,
                           degraded=degraded, skipped=skipped)

    @staticmethod
    def _known_targets(query: ScoreQuery, candidates: dict[str, Item | None]) -> tuple[list[str], list[str]]:
        unknown = [i for i, item in candidates.items() if item is None]
        if unknown and not query.skip_unknown:
            raise ApiError(404, "unknown_items", f"unknown item ids: {', '.join(unknown[:20])}",
                           field="item_ids", details=[{"item_id": i} for i in unknown])
        return [i for i in query.item_ids if candidates[i] is not None], unknown

    async def _retrieve(self, context: UserContext, targets: list[str], k: int, mode: Mode,
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
                 candidates: dict[str, Item | None], targets: list[str]
                 ) -> tuple[list[list[int]], dict[str, list[Behaviour]]]:
        """Token ids per target within the token budget, and the behaviours each prompt shows."""
        prompts, shown = [], {}
        for t in targets:
            # A behaviour whose item left the catalog cannot be described; it is left out.
            picks = [b for b in chosen[t] if b.item_id in known]
            try:
                ids, shown[t] = encode_within_budget(self.codec, context.profile, picks, known, candidates[t],
                                                     self.limits.max_prompt_tokens)
            except PromptTooLong as exc:
                raise ApiError(422, "prompt_too_long", str(exc), field="item_ids") from None
            prompts.append(ids)
        return prompts, shown

    async def _llm_scores(self, context: UserContext, query: ScoreQuery, targets: list[str],
                          prompts: list[list[int]], deadline: float, timings: dict[str, float],
                          degraded: list[str]) -> tuple[Route, list[AnswerLogprobs]]:
        """Route and score through the engine within the deadline; the CRM's scores when the engine fails."""
        route = Route(adapter=None)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                with self.metrics.stage("routing", timings):
                    route = await self.router.route(context, query.adapter, query.mode)
                with self.metrics.stage("engine", timings):
                    answers = await self.engine.score(prompts, route.adapter, affinity=context.user_id)
        except (EngineError, TimeoutError) as exc:
            if isinstance(exc, AdapterLoadFailed):  # a named adapter the engine refuses: the caller's choice
                raise
            self.metrics.engine_calls.labels(route.label, "error").inc()
            if isinstance(exc, TimeoutError):
                exc = EngineError(f"engine past the request deadline of {self.limits.deadline_s:g} s", timeout=True)
            if self.crm is None:
                raise exc from None
            log.warning("LLM degraded to the CRM: %s", exc)
            self._degrade("llm", degraded)
            answers = await asyncio.to_thread(self.crm.answers, context.user_id, context.profile,
                                              context.behaviours, targets)
            return Route(adapter=f"crm:{self.crm.name}", mode="crm", fallbacks=route.fallbacks), answers
        self.metrics.engine_calls.labels(route.label, "ok").inc()
        self.metrics.engine_prompts.inc(len(prompts))
        return route, answers

    def _degrade(self, part: str, degraded: list[str]) -> None:
        degraded.append(part)
        self.metrics.degraded.labels(part).inc()

    async def rank(self, query: ScoreQuery, top_k: int | None) -> ScoreResult:
        result = await self.score(query)
        # Stable sort: equal scores keep the request's order.
        result.scored = sorted(result.scored, key=lambda s: -s.answer.p_yes)[:top_k]
        return result
