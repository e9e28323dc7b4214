"""What the first request after "ready" costs on a fresh start, with and without the warm-up.

For each variant a fresh vLLM engine and a fresh gateway start on the ingested store of the LOREC_*
settings (the shipped or configured models); once `/readyz` answers 200, two `/v1/rank` requests of
20 candidates for two different users (so no prefix cache helps the second) are timed. The variants:
`warm` (the default: the gateway is ready only after the engine scored the warm-up batches) and
`cold` (LOREC_ENGINE_WARMUP_CANDIDATES=0: ready as soon as the dependencies answer, as before).

    .venv/bin/python benchmarks/warm_start.py -> benchmarks/results/warm_start.json

Target (issue 28): with the warm-up, the first request costs at most twice the second.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import typer
from bench_io import command, machine, save

from service.auth import auth_headers
from service.config import Settings
from service.stack import Stack

USERS = ("1", "2")  # two users with histories: the second request reuses no prefix of the first
ITEMS = [str(i) for i in range(101, 121)]


def timed_rank(gateway: str, headers: dict, user: str) -> float:
    start = time.perf_counter()
    response = httpx.post(f"{gateway}/v1/rank", headers=headers, timeout=600,
                          json={"user_id": user, "item_ids": ITEMS, "top_k": 10})
    response.raise_for_status()
    return time.perf_counter() - start


def fresh_start(settings: Settings, warmup_candidates: int) -> dict:
    with Stack(settings.data_dir / "logs") as stack:
        stack.redis(settings.data_dir / "redis", settings.redis.url)
        started = time.perf_counter()
        engine_url, _ = stack.engine(settings, name="vllm-warm-start")
        engine_ready = time.perf_counter() - started
        gateway = stack.gateway({"LOREC_ENGINE_URL": engine_url,
                                 "LOREC_ENGINE_WARMUP_CANDIDATES": str(warmup_candidates)}, name="gateway-warm-start")
        ready = time.perf_counter() - started
        headers = auth_headers(Settings())
        first, second = (timed_rank(gateway, headers, user) for user in USERS)
    return {"warmup_candidates": warmup_candidates, "engine_health_s": round(engine_ready, 1),
            "ready_s": round(ready, 1), "first_s": round(first, 2), "second_s": round(second, 2),
            "first_over_second": round(first / second, 2)}


def main(out: Path = typer.Option(Path(__file__).parent / "results" / "warm_start.json")) -> None:
    settings = Settings()
    variants = {"cold": fresh_start(settings, 0), "warm": fresh_start(settings, settings.engine.warmup_candidates)}
    report = {"command": command(), "machine": machine(), "model": str(settings.model_dir.name),
              "request": f"/v1/rank, {len(ITEMS)} candidates, K={settings.requests.history_k}", **variants,
              "target_met": variants["warm"]["first_over_second"] <= 2.0}
    save(out, report)


if __name__ == "__main__":
    typer.run(main)
