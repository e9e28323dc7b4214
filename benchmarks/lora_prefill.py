"""Prefill speed through LoRA adapters on the vLLM engine, against the base model in the same run.

    .venv/bin/python benchmarks/lora_prefill.py [--prompts 20] [--tokens 210] [--rounds 3]

Starts the engine twice on the prepared model (LOREC_DATA_DIR, default var/): with the lorec_cpu_lora
plugin and with vLLM's own CPU LoRA ops. Each time it scores batches of distinct random prompts
(no prefix-cache hits) through the base model, one rank-8 q/v adapter, and 8 adapters mixed in one
batch (8 concurrent requests), and reports prompt tokens/s and the ratio to the base model.
Results go to benchmarks/results/lora_prefill.json with the command.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine, save  # noqa: E402

from service.config import Settings  # noqa: E402
from service.stack import Stack  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lora_prefill.json"


def make_adapters(model_dir: Path, out: Path, n: int, rank: int = 8) -> list[Path]:
    """n random rank-r q/v adapters in PEFT format (B is non-zero so they change the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
        torch.manual_seed(i)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
        paths.append(out / f"bench-{i}")
        model.save_pretrained(str(paths[-1]))
    return paths


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[2] + [rng.randrange(1000, 30000) for _ in range(length)] for _ in range(n)]


async def timed(client: httpx.AsyncClient, batches: list[tuple[str, list[list[int]]]]) -> float:
    """Send the batches concurrently (one request each); tokens/s over the whole set."""
    async def one(model: str, prompts: list[list[int]]) -> None:
        r = await client.post("/v1/completions", json={"model": model, "prompt": prompts, "max_tokens": 1,
                                                        "temperature": 0.0})
        r.raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(one(m, p) for m, p in batches))
    return sum(len(x) for _, p in batches for x in p) / (time.perf_counter() - started)


async def measure(url: str, adapters: list[Path], prompts: int, tokens: int, rounds: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        for i, path in enumerate(adapters):
            (await client.post("/v1/load_lora_adapter", json={"lora_name": f"bench-{i}",
                                                              "lora_path": str(path)})).raise_for_status()
        seed = iter(range(10_000))
        per_adapter = max(1, prompts // len(adapters))

        def cases() -> dict[str, list[tuple[str, list[list[int]]]]]:
            return {"base": [("base", random_prompts(prompts, tokens, next(seed)))],
                    "lora_1": [("bench-0", random_prompts(prompts, tokens, next(seed)))],
                    "lora_8_mixed": [(f"bench-{i}", random_prompts(per_adapter, tokens, next(seed)))
                                     for i in range(len(adapters))]}

        for batches in cases().values():  # warm-up: first use of each adapter, kernels
            await timed(client, batches)
        results: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, batches in cases().items():
                results.setdefault(name, []).append(await timed(client, batches))
    best = {name: max(v) for name, v in results.items()}
    return {"tokens_per_s": {k: round(v, 1) for k, v in best.items()},
            "ratio_to_base": {k: round(v / best["base"], 3) for k, v in best.items() if k != "base"}}


def run_engine(settings: Settings, fast_lora: bool, adapters: list[Path], log: Path, **sizes) -> dict:
    settings = settings.replace(**{"engine_fast_lora": fast_lora, "engine_max_loras": len(adapters),
                                           "engine_max_cpu_loras": len(adapters)})
    with Stack(log.parent) as stack:
        url, _ = stack.engine(settings, name=log.stem)
        return asyncio.run(measure(url, adapters, **sizes))


def main(prompts: int = typer.Option(20, help="prompts per batch"), tokens: int = typer.Option(210),
         rounds: int = typer.Option(3), n_adapters: int = typer.Option(8),
         out: Path = typer.Option(RESULTS)) -> None:
    settings = Settings()
    sizes = {"prompts": prompts, "tokens": tokens, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(settings.model_dir, Path(tmp), n_adapters)
        report = {variant: run_engine(settings, fast, adapters, settings.data_dir / f"bench-{variant}.log", **sizes)
                  for variant, fast in (("plugin", True), ("vllm_ops", False))}
    report.update({"prompts_per_batch": prompts, "tokens_per_prompt": tokens + 1, "rounds": rounds,
                   "model": settings.model_dir.name, "dtype": settings.engine.dtype,
                   "machine": machine(), "cpus": os.cpu_count(),
                   "command": command()})
    save(out, report)


if __name__ == "__main__":
    typer.run(main)
