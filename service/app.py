"""`create_app(settings)`: the gateway. Clients open in the lifespan and close in `finally`."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

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
from service.history import HistoryStore, Keys, compile_decoder, connect
from service.metrics import Metrics
from service.personalize import Personalizer, open_personalizer
from service.prompt import PromptCodec, load_codec
from service.recommend import Limits, RecommendService
from service.retrieval import open_configured_index
from service.routing import BASE, AdapterRegistry, Router
from service.scoring import EngineClient, EnginePool
from service.warmup import WarmupState, warm_up, warmup_prompts
from service.writes import Writer

log = logging.getLogger(__name__)


def start_adapters(router: Router, personalizer: Personalizer | None) -> list[tuple[str, Path]]:
    """The adapters served from the start (warmed up before ready): the default one, the cohorts
    (written here); personal adapters are made per user on first use."""
    adapters = []
    if router.default_adapter not in (None, BASE) and router.default_adapter in router.registry.names():
        adapters.append((router.default_adapter, router.registry.path(router.default_adapter)))
    if personalizer is not None:
        adapters += list(personalizer.cohorts())
    return adapters


def start_warmup(settings: Settings, codec: PromptCodec, router: Router, metrics: Metrics) -> WarmupState:
    state = WarmupState(done=settings.engine.warmup_candidates == 0)
    if state.done:
        metrics.warm.set(1)
        return state
    prompts = warmup_prompts(codec, settings.engine.warmup_candidates, settings.requests.history_k,
                             settings.prompt_budget)
    adapters = start_adapters(router, router.personalizer)

    async def run() -> None:
        await warm_up(router.engine, adapters, prompts, state)
        metrics.warm.set(1)
    state.task = asyncio.create_task(run())
    return state


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
            compile_decoder()
            engine = EnginePool([EngineClient(http, settings.engine.model_name, codec.answer,
                                              on_load=lambda outcome: metrics.adapter_loads.labels(outcome).inc())
                                 for http in https])
            personalizer = open_personalizer(settings)
            registry = AdapterRegistry(settings.registry_dir)
            crm, scorers = open_scoring(settings, registry, personalizer)
            router = Router(registry, engine, settings.adapters.default, settings.adapters.mode, personalizer,
                            crm=crm.ref if crm else None)
            metrics.quarantined.set_function(lambda: len(router.quarantined))
            app.state.warmup = start_warmup(settings, codec, router, metrics)
            limits = Limits.of(settings.requests, settings.prompt_budget)
            app.state.recommender = RecommendService(
                history, index, codec, engine, router, metrics, default_k=settings.requests.history_k,
                default_mode=settings.requests.retrieval_mode, limits=limits, scorers=scorers, crm=crm,
                features=FeatureReader(history, crm.spec) if crm else None)
            app.state.writer = Writer(history, index,
                                      build_encoder(settings.index.encoder, model_dir, settings.data_dir,
                                                    settings.index.encoder_dim))
            # The ~600k objects of the start (torch's and vLLM's modules, the CRM, the caches' first contents)
            # live as long as the process: a full collection that scans them pauses every request ~0.6 s here
            # (benchmarks/gateway_gc.py). Collected once, then frozen out of the collector's scans.
            gc.collect()
            gc.freeze()
            yield
        finally:
            warmup = getattr(app.state, "warmup", None)
            if warmup is not None and warmup.task is not None:
                warmup.task.cancel()
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
