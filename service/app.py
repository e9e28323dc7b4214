"""`create_app(settings)`: the gateway. Clients open in the lifespan and close in `finally`."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request

from service.api import router
from service.artifacts import ArtifactError
from service.auth import load_keyring
from service.combine import Combiner, ComponentRef, Scorers, llm_serving, open_combiner, refusal
from service.config import Settings
from service.crm import Crm, open_crm
from service.encoder import build_encoder
from service.errors import register_error_handlers
from service.features import FeatureReader
from service.history import HistoryStore, Keys, connect
from service.metrics import Metrics
from service.personalize import Personalizer, open_personalizer
from service.prompt import load_codec
from service.recommend import Limits, RecommendService
from service.retrieval import open_configured_index
from service.routing import AdapterRegistry, Router
from service.scoring import EngineClient, EnginePool
from service.writes import Writer

log = logging.getLogger(__name__)


async def load_cohorts(router: Router, personalizer: Personalizer) -> None:
    """Cohort adapters are written and loaded at start; an engine not up yet loads them on first use."""
    for name, path in personalizer.cohorts():
        try:
            await router.engine.ensure_adapter(name, path)
        except Exception as exc:  # noqa: BLE001 - start anyway; routing retries or falls back
            log.warning("cohort adapter %s not loaded at start: %s", name, exc)
            return


def open_scoring(settings: Settings, registry: AdapterRegistry, personalizer: Personalizer | None
                 ) -> tuple[Crm | None, Scorers]:
    """The CRM and the combiner, each checked; one that cannot serve leaves its scorer unavailable (the
    service starts on the next scorer and says why) instead of serving a wrong score."""
    unavailable: dict[str, str] = {}
    crm: Crm | None = None
    combiner: Combiner | None = None
    try:
        crm = open_crm(settings.data_dir, settings.scoring.crm)
    except ArtifactError as error:
        unavailable["crm"] = unavailable["hybrid"] = f"CRM refused: {error}"
    try:
        combiner = open_combiner(settings.data_dir, settings.scoring.combiner)
    except ArtifactError as error:
        unavailable.setdefault("hybrid", f"combiner refused: {error}")
    if combiner is not None:
        why = refusal(combiner, ComponentRef(name=crm.name, version=crm.version) if crm else None,
                      llm_serving(combiner.manifest.llm.mode, combiner.manifest.llm.name, settings, registry,
                                  personalizer))
        if why is not None:
            unavailable.setdefault("hybrid", f"combiner refused: {why}")
            combiner = None
    for scorer, why in unavailable.items():
        log.error("scorer %s unavailable: %s", scorer, why)
    return crm, Scorers(settings.scoring.default, crm is not None, combiner, unavailable)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model_dir = settings.model_dir
        codec = load_codec(model_dir)
        redis = connect(settings.redis.url, settings.redis.cluster, socket_timeout=5, socket_connect_timeout=2,
                        health_check_interval=30)
        index = open_configured_index(settings.index, settings.edge_path)
        timeout = httpx.Timeout(settings.engine.timeout_s, connect=settings.engine.connect_timeout_s)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        https = [httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) for url in settings.engine.urls]
        try:
            history = HistoryStore(redis, Keys(settings.redis.prefix), settings.requests.max_history_events)
            engine = EnginePool([EngineClient(http, settings.engine.model_name, codec.answer,
                                              on_load=lambda outcome: metrics.adapter_loads.labels(outcome).inc())
                                 for http in https])
            personalizer = open_personalizer(settings)
            router = Router(AdapterRegistry(settings.registry_dir), engine, settings.adapters.default,
                            settings.adapters.mode, personalizer)
            if personalizer is not None:
                await load_cohorts(router, personalizer)
            limits = Limits.of(settings.requests, settings.prompt_budget)
            crm, scorers = open_scoring(settings, router.registry, personalizer)
            app.state.recommender = RecommendService(
                history, index, codec, engine, router, metrics, default_k=settings.requests.history_k,
                default_mode=settings.requests.retrieval_mode, limits=limits, scorers=scorers, crm=crm,
                features=FeatureReader(history, crm.spec) if crm else None)
            app.state.writer = Writer(history, index,
                                      build_encoder(settings.index.encoder, model_dir, settings.data_dir,
                                                    settings.index.encoder_dim))
            yield
        finally:
            for http in https:
                await http.aclose()
            await index.close()
            await redis.aclose()

    app = FastAPI(title="lorec", version="0.1.0", lifespan=lifespan,
                  description="LLM recommendations: CTR scores and ranked lists from a user's lifelong history.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keyring = load_keyring(settings)
    register_error_handlers(app)
    app.include_router(router)

    @app.middleware("http")
    async def observe_latency(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request_seconds.labels(getattr(route, "path", "unmatched"), request.method,
                                       str(response.status_code)).observe(time.perf_counter() - start)
        return response

    return app
