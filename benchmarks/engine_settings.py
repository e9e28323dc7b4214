"""Engine settings on this CPU: prefill tokens/s of the vLLM engine under each configuration, one run.

    .venv/bin/python benchmarks/engine_settings.py [--prompts 20] [--tokens 210] [--rounds 2]

Starts the engine (prepared model under LOREC_DATA_DIR, the lorec_cpu_lora plugin on) once per
configuration — float32 (the reference) / bfloat16 / int8 W8A8 weights (LOREC_ENGINE_WEIGHTS=int8) / AMD's zentorch
kernels (LOREC_ENGINE_KERNELS=zentorch) in fp32 and bf16,
max_num_batched_tokens default / 1024 / 8192 — and scores the same kind of batches as
benchmarks/lora_prefill.py: distinct random prompts (no prefix-cache hits) through the base model, one
rank-8 q/v adapter and 8 adapters mixed. Reports tokens/s, the ratio to the first row
and to a plain matmul chain of the model's shapes in the configuration's compute dtype (perf.matmul_ceiling,
measured in the same run; int8 x int8 -> int32 for W8A8). Results go to benchmarks/results/engine_settings.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine, save  # noqa: E402
from lora_prefill import make_adapters, run_engine  # noqa: E402
from perf import matmul_ceiling  # noqa: E402

from service.config import Settings  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "engine_settings.json"
CONFIGS = {  # the first is the reference (fp32); the default engine is "bf16 oneDNN" on AVX512_BF16 / AMX CPUs
    "fp32 oneDNN": {"engine_kernels": "onednn", "engine_dtype": "float32"},
    "zentorch fp32": {"engine_kernels": "zentorch", "engine_dtype": "float32"},
    "zentorch bf16": {"engine_kernels": "zentorch", "engine_dtype": "bfloat16"},
    "int8 W8A8": {"engine_weights": "int8", "engine_kernels": "onednn", "engine_dtype": "float32"},
    "bf16 oneDNN": {"engine_dtype": "bfloat16", "engine_kernels": "onednn"},  # the answer logits in fp32
    "bf16 oneDNN (fp32 head)": {"engine_dtype": "bfloat16", "engine_kernels": "onednn", "engine_head_dtype": "float32"},
    "bf16 oneDNN (bf16 head)": {"engine_dtype": "bfloat16", "engine_kernels": "onednn", "engine_head_dtype": "model"},
    # Gemma's norms and rotary embedding as vLLM runs them (eager torch ops), not the plugin's fused kernels
    "fp32 oneDNN (native ops)": {"engine_kernels": "onednn", "engine_dtype": "float32", "engine_ops": "native"},
    "bf16 oneDNN (native ops)": {"engine_kernels": "onednn", "engine_dtype": "bfloat16", "engine_ops": "native"},
    "fp32 oneDNN, max_num_batched_tokens=1024": {"engine_kernels": "onednn", "engine_dtype": "float32",
                                                 "engine_max_num_batched_tokens": 1024},
    "fp32 oneDNN, max_num_batched_tokens=8192": {"engine_kernels": "onednn", "engine_dtype": "float32",
                                                 "engine_max_num_batched_tokens": 8192},
    # vLLM's CPU server default is 2,048 tokens a step: a subr request (20 prompts of ~258 tokens) takes three
    # (names without commas: engine_variants.py splits its --variants on them)
    **{f"bf16 oneDNN ({n} tokens a step)": {"engine_kernels": "onednn", "engine_dtype": "bfloat16",
                                            "engine_max_num_batched_tokens": n} for n in (512, 1024, 4096, 8192)},
}


def ceiling_of(settings: Settings) -> dict:
    """perf.matmul_ceiling in the variant's compute dtype (int8 for W8A8 weights), measured in this process."""
    dtype = torch.int8 if settings.engine.weights == "int8" else getattr(torch, settings.engine.dtype)
    return matmul_ceiling(settings.model_dir, dtype)


def main(prompts: int = typer.Option(20, help="prompts per batch"), tokens: int = typer.Option(210),
         rounds: int = typer.Option(2), only: str = typer.Option("", help="comma-separated config names"),
         out: Path = typer.Option(RESULTS)) -> None:
    settings = Settings()
    torch.set_num_threads(os.cpu_count() or 1)
    sizes = {"prompts": prompts, "tokens": tokens, "rounds": rounds}
    chosen = {k: v for k, v in CONFIGS.items() if not only or k in only.split(",")}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(settings.model_dir, Path(tmp), 8)
        for name, update in chosen.items():
            log = settings.data_dir / "logs" / f"engine-settings-{len(results)}.log"
            results[name] = run_engine(settings.replace(**update), True, adapters, log, **sizes)
            typer.echo(f"{name}: {results[name]['tokens_per_s']}")
    default = next(iter(results.values()))["tokens_per_s"]
    for name, r in results.items():
        r["ratio_to_default"] = {k: round(v / default[k], 3) for k, v in r["tokens_per_s"].items()}
        r["matmul_ceiling"] = ceiling_of(settings.replace(**chosen[name]))
        r["engine_vs_ceiling"] = {k: round(v / r["matmul_ceiling"]["tokens_per_s"], 3)
                                  for k, v in r["tokens_per_s"].items()}
    report = {"configs": results, "prompts_per_batch": prompts, "tokens_per_prompt": tokens + 1,
              "kv_cache_gib": settings.engine.kv_cache_gib,
              "machine": machine(),
              "command": command()}
    save(out, report)


if __name__ == "__main__":
    typer.run(main)
