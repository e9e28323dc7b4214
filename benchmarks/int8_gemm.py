"""int8 against bf16 GEMMs at the served model's shapes, as vLLM's CPU path runs them (issue 29):

    .venv/bin/python benchmarks/int8_gemm.py [--tokens 5160]

Per linear layer of Gemma 3 270M (q/k/v merged, o, gate/up merged, down) and one prefill batch like
`subr`'s (20 prompts of ~258 tokens): vLLM's oneDNN bf16 GEMM (what the shipped engine calls) against its
oneDNN int8 GEMM with dynamic per-token activation quantization and a bf16 output (what a W8A8 layer of
a bf16 engine calls), the quantization timed with it and apart. What int8 could save on which layers,
next to what each scheme costs in agreement (int8_agreement.py). Writes benchmarks/results/int8_gemm.json.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import command, machine, save  # noqa: E402
from perf import linear_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def milliseconds(call: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1000


def layer_figures(k: int, n: int, tokens: int, repeats: int) -> dict:
    """One (tokens, k) x (k, n) product: bf16, and int8 with and without quantizing x."""
    from vllm import _custom_ops as ops

    x = torch.randn(tokens, k, dtype=torch.bfloat16)
    bf16 = ops.create_onednn_mm(torch.randn(k, n, dtype=torch.bfloat16), 32)
    weight = torch.randint(-127, 127, (n, k), dtype=torch.int8).t()  # oneDNN wants it column-major
    int8 = ops.create_onednn_scaled_mm(weight, torch.rand(n) * 0.01, torch.bfloat16, True, False, 32)
    output = torch.empty(tokens, n, dtype=torch.bfloat16)
    x_q, x_scale, _ = ops.onednn_scaled_int8_quant(x)

    def quantized_product() -> torch.Tensor:
        q, s, _ = ops.onednn_scaled_int8_quant(x)
        return ops.onednn_scaled_mm(int8, q, output, s, None, None, None)

    # Both products write into an output made once: a fresh 42 MB tensor per call (vLLM's onednn_mm makes one)
    # costs its page faults under glibc malloc, which would flatter whichever kernel is spared them.
    figures = {"bf16_ms": milliseconds(lambda: torch.ops._C.onednn_mm(output, x, None, bf16.handler_tensor), repeats),
               "int8_with_quantization_ms": milliseconds(quantized_product, repeats),
               "int8_product_alone_ms": milliseconds(
                   lambda: ops.onednn_scaled_mm(int8, x_q, output, x_scale, None, None, None), repeats)}
    return {"k_n": [k, n], **{key: round(v, 2) for key, v in figures.items()},
            "bf16_over_int8": round(figures["bf16_ms"] / figures["int8_with_quantization_ms"], 2)}


def main(tokens: int = typer.Option(5160), repeats: int = typer.Option(10),
         model_dir: Path = typer.Option(ROOT / "var/models/gemma-3-270m", exists=True, file_okay=False),
         out: Path = typer.Option(ROOT / "benchmarks/results/int8_gemm.json")) -> None:
    torch.manual_seed(0)
    layers = {name: layer_figures(k, n, tokens, repeats) for name, (k, n) in linear_shapes(model_dir).items()}
    total_bf16 = sum(v["bf16_ms"] for v in layers.values())
    save(out, {"what": f"one layer's GEMMs over {tokens} tokens: vLLM oneDNN bf16 against int8 W8A8 (bf16 out)",
               "layers": layers, "bf16_ms_per_layer": round(total_bf16, 2),
               "share_of_bf16_time": {k: round(v["bf16_ms"] / total_bf16, 3) for k, v in layers.items()},
               "machine": machine(), "command": command()})


if __name__ == "__main__":
    typer.run(main)
