"""The request flow, one stage after the other:

history (Redis) -> retrieval (Qdrant) -> prompt -> routing (adapter) -> scoring (vLLM).

Routes only translate HTTP; this object does the work and knows nothing of HTTP
beyond raising `ApiError` for what the caller got wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.errors import ApiError
from service.history import HistoryStore
from service.metrics import Metrics
from service.prompt import PromptCodec, build_prompt
from service.records import Behaviour, Item
from service.retrieval import ItemIndex, Mode, select_behaviours
from service.routing import Mode as AdapterMode
from service.routing import Router
from service.scoring import AnswerLogprobs, EngineClient


@dataclass
class ScoreQuery:
    user_id: str
    item_ids: list[str]
    as_of: int | None = None
    adapter: str | None = None
    mode: AdapterMode | None = None
    retrieval: Mode | None = None
    k: int | None = None


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


class RecommendService:
    def __init__(self, history: HistoryStore, index: ItemIndex, codec: PromptCodec, engine: EngineClient,
                 router: Router, metrics: Metrics, *, default_k: int, default_mode: Mode,
                 max_candidates: int) -> None:
        self.history = history
        self.index = index
        self.codec = codec
        self.engine = engine
        self.router = router
        self.metrics = metrics
        self.default_k = default_k
        self.default_mode = default_mode
        self.max_candidates = max_candidates

    async def score(self, query: ScoreQuery) -> ScoreResult:
        if len(query.item_ids) > self.max_candidates:
            raise ApiError(422, "invalid_request", f"at most {self.max_candidates} item_ids per request",
                           field="item_ids")
        k = self.default_k if query.k is None else query.k
        mode = query.retrieval or self.default_mode
        timings: dict[str, float] = {}
        stage = self.metrics.stage

        with stage("history", timings):
            context, candidates = await self.history.load_request(query.user_id, query.item_ids, query.as_of)
        unknown = [i for i, item in candidates.items() if item is None]
        if unknown:
            raise ApiError(404, "unknown_items", f"unknown item ids: {', '.join(unknown[:20])}",
                           field="item_ids", details=[{"item_id": i} for i in unknown])

        with stage("retrieval", timings):
            chosen = await select_behaviours(self.index, context.behaviours, query.item_ids, k, mode)
        with stage("catalog", timings):
            catalog = await self.history.items({b.item_id for picks in chosen.values() for b in picks})
        known = {i: item for i, item in catalog.items() if item is not None}
        with stage("prompt", timings):
            # A behaviour whose item left the catalog cannot be described; it is left out.
            chosen = {t: [b for b in picks if b.item_id in known] for t, picks in chosen.items()}
            prompts = [self.codec.encode(build_prompt(context.profile, chosen[t], known, candidates[t]))
                       for t in query.item_ids]
        with stage("routing", timings):
            route = await self.router.route(context, query.adapter, query.mode)
        with stage("engine", timings):
            try:
                answers = await self.engine.score(prompts, route.adapter)
            except Exception:
                self.metrics.engine_calls.labels(route.label, "error").inc()
                raise
        self.metrics.engine_calls.labels(route.label, "ok").inc()
        self.metrics.engine_prompts.inc(len(prompts))
        scored = [Scored(t, a, chosen[t], p) for t, a, p in zip(query.item_ids, answers, prompts)]
        return ScoreResult(user_id=query.user_id, adapter=route.label, adapter_mode=route.mode, retrieval=mode,
                           k=k, history_size=len(context.behaviours), scored=scored, fallbacks=route.fallbacks,
                           catalog={**known, **{i: c for i, c in candidates.items() if c}}, timings=timings)

    async def rank(self, query: ScoreQuery, top_k: int | None) -> ScoreResult:
        result = await self.score(query)
        # Stable sort: equal scores keep the request's order.
        result.scored = sorted(result.scored, key=lambda s: -s.answer.p_yes)[:top_k]
        return result
