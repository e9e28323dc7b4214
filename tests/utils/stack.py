"""What the tests share about the stack they run: the data, the test API keys, settings, engines, gateways."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from service.config import Settings
from service.processes import Managed
from service.scoring import EngineClient, p_yes
from service.stack import LOREC, Stack

REPO = Path(__file__).resolve().parents[2]
ML100K = Path(os.environ.get("LOREC_TEST_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))
# Test API keys: one per scope and one with all of them (what most tests use).
KEYS = {"test-admin-key-0123456789": ["read", "write", "admin"], "test-read-key-0123456789": ["read"],
        "test-write-key-0123456789": ["write"]}
ADMIN_KEY, READ_KEY, WRITE_KEY = KEYS
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Events the tests post to the shared store come after the data set: the data's point-in-time statistics
# (item counts and means at a sample's as_of) must stay what the trainer computes from the files.
AFTER_DATA = 2_000_000_000


def start_engine(settings: Settings, model_dir: Path, log_path: Path) -> tuple[Managed, str]:
    """A vLLM server of `model_dir` (stopped with the returned process's `stop`) and its URL."""
    stack = Stack(log_path.parent)
    try:
        url, engine = stack.engine(settings, model_dir, name=log_path.stem)
    except BaseException:
        stack.close()
        raise
    return engine, url


def engine_scores(url: str, codec, prompts: list[list[int]], adapter_dir: Path, adapter: str | None) -> list[float]:
    """P(Yes) of each prompt from the engine at `url`, through `adapter` (loaded from adapter_dir) or the base."""
    async def run() -> list[float]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            client = EngineClient(http, "base", codec.answer)
            if adapter:
                await client.ensure_adapter(adapter, adapter_dir / adapter)
            return [p_yes(a.yes, a.no) for a in await client.score(prompts, adapter)]
    return asyncio.run(run())


@dataclass
class EngineAgreement:
    """A variant engine against a reference engine on the same fixed prompts, base and through an adapter."""

    mean_dp: dict[str | None, float]  # mean |dp| by adapter (None: the base model)
    max_dp: dict[str | None, float]
    reference_effect: float  # the adapter's largest move of a score on the reference engine
    effect_correlation: float  # of the adapter's moves on the two engines


def engine_agreement(reference: str, variant: str, codec, adapter_dir: Path, adapter: str) -> EngineAgreement:
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(10, 900) for _ in range(60)] for _ in range(12)]
    ref = {a: np.array(engine_scores(reference, codec, prompts, adapter_dir, a)) for a in (None, adapter)}
    var = {a: np.array(engine_scores(variant, codec, prompts, adapter_dir, a)) for a in (None, adapter)}
    deltas = {a: np.abs(ref[a] - var[a]) for a in (None, adapter)}
    effect_ref, effect_var = ref[adapter] - ref[None], var[adapter] - var[None]
    for a in (None, adapter):
        print(f"\n{a or 'base'}: mean |dp| {deltas[a].mean():.6f}, max {deltas[a].max():.6f}")
    print(f"adapter effect reference {np.round(effect_ref, 3)}\n               variant {np.round(effect_var, 3)}")
    return EngineAgreement(mean_dp={a: float(d.mean()) for a, d in deltas.items()},
                           max_dp={a: float(d.max()) for a, d in deltas.items()},
                           reference_effect=float(np.abs(effect_ref).max()),
                           effect_correlation=float(np.corrcoef(effect_ref, effect_var)[0, 1]))


def make_settings(workdir: Path, model: Path, redis_url: str, **overrides) -> Settings:
    values = dict(data_dir=workdir / "data", model=model, redis_url=redis_url, engine_kv_cache_gib=1,
                  engine_max_model_len=4096, adapter_dir=workdir / "adapters", qdrant_url=None, api_keys=KEYS)
    values.update(overrides)
    return Settings(**values)


def serve_env(settings: Settings, data_dir: Path, port: int) -> dict[str, str]:
    """Environment for a `lorec serve` process on a copy of the data folder (one process at a time
    may open a Qdrant Edge shard)."""
    shutil.copytree(settings.data_dir, data_dir)
    env = {**os.environ, "LOREC_DATA_DIR": str(data_dir), "LOREC_MODEL": str(settings.model),
           "LOREC_REDIS_URL": settings.redis.url, "LOREC_ENGINE_URL": settings.engine.url,
           "LOREC_ADAPTER_DIR": str(settings.registry_dir), "LOREC_PORT": str(port),
           "LOREC_API_KEYS": json.dumps(KEYS)}
    env.pop("QDRANT_URL", None)
    return env



__all__ = ["ADMIN_KEY", "AUTH", "KEYS", "LOREC", "ML100K", "READ_KEY", "REPO", "WRITE_KEY", "EngineAgreement",
           "engine_agreement", "engine_scores",
           "make_settings", "serve_env", "start_engine"]
