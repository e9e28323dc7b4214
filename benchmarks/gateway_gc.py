"""What a full garbage collection costs the gateway, with its start's objects frozen (as served) and not.

The gateway process holds ~600k objects from its start (torch's and vLLM's modules, the CRM, the caches):
a full collection scans them all, and every request waits for it. The lifespan collects once and freezes
them (service/app.py). This builds the gateway the environment configures (as `lorec serve` does), starts
its lifespan, and times full collections as served (frozen), then after `gc.unfreeze()` (the code before).

    LOREC_DATA_DIR=... .venv/bin/python benchmarks/gateway_gc.py -> benchmarks/results/gateway_gc.json
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import typer
from bench_io import command, machine, save

from service.app import create_app
from service.config import Settings


def collections_ms(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        times.append(round((time.perf_counter() - started) * 1000, 2))
    return times


async def measure(repeats: int) -> dict:
    app = create_app(Settings())
    async with app.router.lifespan_context(app):
        frozen = gc.get_freeze_count()
        served = collections_ms(repeats)
        gc.unfreeze()
        unfrozen = collections_ms(repeats)
        return {"frozen_objects": frozen, "tracked_objects_unfrozen": len(gc.get_objects()),
                "full_collection_ms_as_served": served, "full_collection_ms_unfrozen": unfrozen}


def main(repeats: int = typer.Option(3), out: Path = typer.Option(Path("benchmarks/results/gateway_gc.json"))) -> None:
    figures = asyncio.run(measure(repeats))
    save(out, {"what": "full gc.collect() in a started gateway (the environment's settings): its start's objects "
                       "frozen as served, then unfrozen (the code before)", **figures,
               "machine": machine(), "command": command()})


if __name__ == "__main__":
    typer.run(main)
