"""Real servers as session fixtures: redis-server, vLLM (tiny Llama; Gemma for the marked tests)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from service.config import Settings
from service.ingest import ingest_folder
from service.model import resolve_model
from service.processes import Managed, free_port
from service.stack import LOREC, Stack
from tests.utils.crm import build_crm
from tests.utils.http import wait_ready
from tests.utils.stack import AUTH, ML100K, REPO, make_settings, serve_env, start_engine
from tests.utils.tiny_model import build_random_adapter, build_tiny_llama

# The suite's engines run fp32, the reference its agreement tests compare served scores to (offline
# transformers, /v1/rank against /v1/ctr); the default's bf16 path is tested in test_bf16_engine.py.
os.environ.setdefault("LOREC_ENGINE_DTYPE", "float32")

# Tests that use one of these run real processes (redis-server, vLLM, a gateway) or a model: marked `slow`,
# so `pytest -m "not slow"` runs the rest (the request flow on fakes, pure logic) in well under a minute.
PROCESS_FIXTURES = {"redis_url", "tiny_model", "tiny_engine", "gemma_model", "gemma_engine", "ingested",
                    "tiny_settings", "gateway", "http_gateway", "adapter_dir"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lorec")


@pytest.fixture(scope="session")
def redis_url(workdir):
    with Stack(workdir / "logs") as stack:
        yield stack.redis(workdir / "redis")


@pytest.fixture(scope="session")
def tiny_model(workdir) -> Path:
    return build_tiny_llama(workdir / "tiny-llama")


@pytest.fixture(scope="session")
def adapter_dir(workdir, tiny_model) -> Path:
    registry = workdir / "adapters"
    build_random_adapter(tiny_model, registry / "tiny-random-v1")
    return registry


@pytest.fixture(scope="session")
def tiny_engine(workdir, tiny_model, redis_url, adapter_dir):
    engine, url = start_engine(make_settings(workdir, tiny_model, redis_url), tiny_model,
                               workdir / "logs" / "vllm-tiny.log")
    yield url
    engine.stop()


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    configured = os.environ.get("LOREC_MODEL")
    return resolve_model(Path(configured) if configured else None, REPO / "var", prepare=True)


@pytest.fixture(scope="session")
def gemma_engine(workdir, gemma_model, redis_url, tiny_engine):
    engine, url = start_engine(make_settings(workdir, gemma_model, redis_url), gemma_model,
                               workdir / "logs" / "vllm-gemma.log")
    yield url
    engine.stop()


@pytest.fixture(scope="session")
def ingested(workdir, tiny_model, redis_url) -> dict:
    """ML-100K in Redis and the embedded Qdrant Edge index, item vectors from the tiny model.

    Ingested twice: the second report shows whether a re-run is idempotent."""
    settings = make_settings(workdir, tiny_model, redis_url)
    first = asyncio.run(ingest_folder(settings, ML100K))
    return {**first, "rerun": asyncio.run(ingest_folder(settings, ML100K))}


@pytest.fixture(scope="session")
def tiny_settings(workdir, tiny_model, redis_url, tiny_engine, ingested) -> Settings:
    return make_settings(workdir, tiny_model, redis_url, engine_url=tiny_engine)


@pytest.fixture(scope="session")
def gateway(tiny_settings):
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(tiny_settings), headers=AUTH) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="session")
def http_gateway(tiny_settings, workdir):
    """`lorec serve` as a separate process, configured by environment only. Yields (url, env, process)."""
    port = free_port()
    env = serve_env(tiny_settings, workdir / "http-gateway-data", port)
    server = Managed("gateway", [LOREC, "serve"], workdir / "logs" / "gateway.log", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        server.wait_http(f"{base}/readyz", 120)
        yield base, env, server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def crm_fallback_settings(tiny_settings, workdir) -> Settings:
    """The LLM alone by default with a real feature CRM behind it, so that falling back to it is a degradation."""
    data_dir = workdir / "crm-fallback" / "data"
    build_crm(data_dir, ML100K, "fallback-gbdt")
    return tiny_settings.replace(**{"data_dir": data_dir, "crm": "fallback-gbdt", "scorer": "llm"})
