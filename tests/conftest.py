"""Real servers as session fixtures: redis-server, vLLM (tiny Llama; Gemma for the marked tests)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from service.config import Settings
from service.ingest import ingest_folder
from service.model import resolve_model
from service.processes import Managed, free_port
from service.stack import LOREC, Stack
from tests.utils.tiny_model import build_random_adapter, build_tiny_llama

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("LOREC_TEST_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))
# Test API keys: one per scope and one with all of them (what most tests use).
KEYS = {"test-admin-key-0123456789": ["read", "write", "admin"], "test-read-key-0123456789": ["read"],
        "test-write-key-0123456789": ["write"]}
ADMIN_KEY, READ_KEY, WRITE_KEY = KEYS
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


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


def start_engine(settings: Settings, model_dir: Path, log_path: Path) -> tuple[Managed, str]:
    """A vLLM server of `model_dir` (stopped with the returned process's `stop`) and its URL."""
    stack = Stack(log_path.parent)
    try:
        url, engine = stack.engine(settings, model_dir, name=log_path.stem)
    except BaseException:
        stack.close()
        raise
    return engine, url


def make_settings(workdir: Path, model: Path, redis_url: str, **overrides) -> Settings:
    values = dict(data_dir=workdir / "data", model=model, redis_url=redis_url, engine_kv_cache_gib=1,
                  engine_max_model_len=4096, adapter_dir=workdir / "adapters", qdrant_url=None, api_keys=KEYS)
    values.update(overrides)
    return Settings(**values)


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
        yield client




def serve_env(settings: Settings, data_dir: Path, port: int) -> dict[str, str]:
    """Environment for a `lorec serve` process on a copy of the data folder (one process at a time
    may open a Qdrant Edge shard)."""
    shutil.copytree(settings.data_dir, data_dir)
    env = {**os.environ, "LOREC_DATA_DIR": str(data_dir), "LOREC_MODEL": str(settings.model),
           "LOREC_REDIS_URL": settings.redis_url, "LOREC_ENGINE_URL": settings.engine_url,
           "LOREC_ADAPTER_DIR": str(settings.registry_dir), "LOREC_PORT": str(port),
           "LOREC_API_KEYS": json.dumps(KEYS)}
    env.pop("QDRANT_URL", None)
    return env


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
