"""HTTP routes: translate requests into service calls and results into response bodies."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.auth import require
from service.errors import ApiError, as_api_error
from service.recommend import RecommendService, ScoreQuery, ScoreResult
from service.records import Behaviour, Item
from service.schemas import (
    MAX_ID_LENGTH,
    AdaptersResponse,
    BehaviourOut,
    Components,
    CtrRequest,
    CtrResponse,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    HistoryResponse,
    ItemIn,
    ItemOut,
    ItemScore,
    ProfileOut,
    RankRequest,
    RankResponse,
    ScoreOptions,
    ScorersOut,
)
from service.writes import Writer


def get_recommender(request: Request) -> RecommendService:
    return request.app.state.recommender


def get_writer(request: Request) -> Writer:
    return request.app.state.writer


Recommender = Annotated[RecommendService, Depends(get_recommender)]
Writes = Annotated[Writer, Depends(get_writer)]
PathId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$")]
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 422, 503, 504)}
READ, WRITE, ADMIN = require("read"), require("write"), require("admin")

router = APIRouter()


def _behaviour_out(b: Behaviour, catalog: dict[str, Item]) -> BehaviourOut:
    item = catalog.get(b.item_id)
    return BehaviourOut(item_id=b.item_id, ts=b.ts, rating=b.rating, title=item.title if item else None)


def _item_scores(result: ScoreResult, options: ScoreOptions) -> list[ItemScore]:
    return [ItemScore(item_id=s.item_id, score=s.score, logprob_yes=s.llm.yes if s.llm else None,
                      logprob_no=s.llm.no if s.llm else None,
                      components=Components(llm=s.llm.p_yes if s.llm else None, crm=s.crm) if options.explain
                      else None,
                      why=[_behaviour_out(b, result.catalog) for b in s.behaviours] if options.explain else None,
                      prompt_token_ids=s.prompt if options.return_prompt else None)
            for s in result.scored]


def _query(body: CtrRequest) -> ScoreQuery:
    o = body.options
    return ScoreQuery(user_id=body.user_id, item_ids=body.item_ids, as_of=body.as_of, adapter=o.adapter,
                      mode=o.mode, retrieval=o.retrieval, k=o.k, skip_unknown=o.skip_unknown, scorer=o.scorer,
                      explain=o.explain)


def _meta(result: ScoreResult) -> dict:
    return dict(user_id=result.user_id, adapter=result.adapter, adapter_mode=result.adapter_mode,
                scorer=result.scorer, combiner=result.combiner,
                fallbacks=result.fallbacks or None, retrieval=result.retrieval, k=result.k,
                history_size=result.history_size, degraded=result.degraded or None,
                skipped=result.skipped or None)


def _server_timing(result: ScoreResult, response: Response) -> None:
    """Per-stage durations (ms) in the standard Server-Timing header: benchmarks read the gateway's
    own share of a request from it."""
    response.headers["server-timing"] = ", ".join(f"{stage};dur={seconds * 1000:.3f}"
                                                  for stage, seconds in result.timings.items())


@router.post("/v1/ctr", response_model=CtrResponse, response_model_exclude_none=True, responses=ERRORS,
             dependencies=[READ])
async def ctr(body: CtrRequest, service: Recommender, response: Response) -> CtrResponse:
    result = await service.score(_query(body))
    _server_timing(result, response)
    return CtrResponse(**_meta(result), scores=_item_scores(result, body.options))


@router.post("/v1/rank", response_model=RankResponse, response_model_exclude_none=True, responses=ERRORS,
             dependencies=[READ])
async def rank(body: RankRequest, service: Recommender, response: Response) -> RankResponse:
    result = await service.rank(_query(body), body.top_k)
    _server_timing(result, response)
    return RankResponse(**_meta(result), items=_item_scores(result, body.options))


@router.post("/v1/events", response_model=EventsResponse, responses=ERRORS, dependencies=[WRITE])
async def events(body: EventsRequest, writer: Writes) -> EventsResponse:
    stored = await writer.append_events(body.events)
    return EventsResponse(accepted=len(body.events), stored=stored)


@router.get("/v1/users/{user_id}/history", response_model=HistoryResponse, responses=ERRORS,
            dependencies=[READ])
async def history(user_id: PathId, service: Recommender,
                  limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                  as_of: Annotated[int | None, Query(ge=0)] = None) -> HistoryResponse:
    context = await service.history.user_history(user_id, as_of, limit)
    if not context.timeline and not await service.history.user_exists(user_id):
        raise ApiError(404, "unknown_user", f"no user {user_id!r}", field="user_id")
    catalog = await service.history.items(context.timeline.item_ids)
    known = {i: c for i, c in catalog.items() if c}
    p = context.profile
    return HistoryResponse(user_id=user_id, profile=ProfileOut(gender=p.gender, age=p.age, occupation=p.occupation),
                           events=[_behaviour_out(b, known) for b in context.behaviours])


@router.put("/v1/items/{item_id}", response_model=ItemOut, responses=ERRORS, dependencies=[WRITE])
async def put_item(item_id: PathId, body: ItemIn, writer: Writes) -> ItemOut:
    await writer.put_items([Item(item_id=item_id, title=body.title, year=body.year, genres=tuple(body.genres))])
    return ItemOut(item_id=item_id, **body.model_dump())


@router.get("/v1/adapters", response_model=AdaptersResponse, responses=ERRORS, dependencies=[ADMIN])
async def adapters(service: Recommender) -> AdaptersResponse:
    router_, scorers = service.router, service.scorers
    crm = f"{service.crm.name}@{service.crm.version}" if service.crm else None
    return AdaptersResponse(registry=router_.registry.names(), loaded=sorted(router_.engine.loaded_adapters),
                            quarantined=sorted(router_.quarantined), default=router_.default_adapter,
                            mode=router_.default_mode,
                            scorers=ScorersOut(default=scorers.default, serving=scorers.serving, crm=crm,
                                               combiner=scorers.combiner.name if scorers.combiner else None,
                                               hybrid_calls_llm=scorers.combiner.uses_llm if scorers.combiner
                                               else None,
                                               unavailable=scorers.unavailable))


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, service: Recommender) -> JSONResponse:
    """Ready: the dependencies answer and the engine has scored the warm-up batches (service/warmup.py)."""
    checks = {"redis": service.history.redis.ping(), "qdrant": service.index.ping(), "vllm": service.engine.ping()}
    outcomes = await asyncio.gather(*checks.values(), return_exceptions=True)
    status = {name: "ok" if not isinstance(o, Exception) else _why(o) for name, o in zip(checks, outcomes)}
    warmup = request.app.state.warmup.describe()
    ready = all(v == "ok" for v in status.values()) and warmup == "ok"
    return JSONResponse({"ready": ready, "dependencies": status, "warmup": warmup}, status_code=200 if ready else 503)


def _why(exc: Exception) -> str:
    error = as_api_error(exc)
    return error.body.message if error else f"{exc.__class__.__name__}: {exc}"


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
