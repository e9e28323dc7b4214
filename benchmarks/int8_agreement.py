"""Which int8 W8A8 scheme would keep the served scores (issue 29): simulated, before building a checkpoint.

    .venv/bin/python benchmarks/int8_agreement.py [--data ../shared/data/ml-1m] [--adapter DIR] [--prompts 40]

The engine's int8 path (quantize.py: per-channel int8 weights, per-token dynamic int8 activations, every
Linear but the output layer) measured mean |dp| 0.039 against fp32 through ML-1M's adapter
(engine_variants_ml1m.json): four times the 0.01 bound. This study finds what would pass before anything is
built: the served model with the adapter on top (PEFT, unmerged, as the engine applies it) in fp32 is the
reference, and each variant replaces its base Linear layers by a simulation of the int8 product
(round-to-nearest int8 weights and activations, their integer products summed in fp32, which is exact up to
2^24 and otherwise off by fp32's own rounding, then the two scales). SmoothQuant moves each input channel's
range from the activations into the weights (x / s and W * s, s = max|x|^a / max|W|^(1-a), from calibration
prompts of the train split); only the foldable groups get it: q/k/v and gate/up share a norm (folded into its
weight), down_proj's input is gelu(gate) * up (folded into up_proj's rows); o_proj's input comes from the
single shared KV head of 4 query heads, so it stays unsmoothed. A bf16 variant (weights and compute) puts the
shipped dtype's error in the same harness. Prompts: seeded test samples, recent K = 10 (no index needed).
Writes benchmarks/results/int8_agreement.json.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine, save  # noqa: E402

from adapters.offline import Dataset  # noqa: E402
from adapters.samples import Sample, draw  # noqa: E402
from service.prompt import PromptCodec, encode_within_budget, load_codec  # noqa: E402
from service.records import Profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ML1M_ADAPTER = ROOT / "adapters/shipped/ml-1m-u2999/adapters/reit-ml-1m-u2999-n4096-k10-r8-s0-cosine-w32"
BOUND = 0.01  # issue 29: mean |dp| against fp32
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
SMOOTHED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")  # foldable (see above)
# name -> (SmoothQuant alpha or None, layers kept in fp32 by name part, layers quantized; None: all)
VARIANTS: dict[str, tuple[float | None, tuple[str, ...], tuple[str, ...] | None]] = {
    "W8A8 every Linear (quantize.py's scheme)": (None, (), None),
    "W8A8, SmoothQuant a=0.5": (0.5, (), None),
    "W8A8, SmoothQuant a=0.8": (0.8, (), None),
    "W8A8, SmoothQuant a=0.8, down_proj kept": (0.8, ("down_proj",), None),
    "W8A8 gate/up only, SmoothQuant a=0.8": (0.8, (), ("gate_proj", "up_proj")),
}


def recent_prompts(dataset: Dataset, samples: list[Sample], codec: PromptCodec, k: int = 10) -> list[list[int]]:
    catalog = {i.item_id: i for i in dataset.data.items}
    out = []
    for s in samples:
        shown = [b for b in s.history()[-k:] if b.item_id in catalog]
        ids, _ = encode_within_budget(codec, dataset.data.profiles.get(s.user_id, Profile()), shown, catalog,
                                      catalog[s.item_id], 1024)
        out.append(ids)
    return out


def p_yes(model, prompts: list[list[int]], codec: PromptCodec) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            out.append(torch.sigmoid(logits[codec.answer.yes] - logits[codec.answer.no]).item())
    return np.array(out)


def base_linears(model) -> dict[str, torch.nn.Linear]:
    """The model's own Linear layers (the adapter's A/B and the output layer stay as they are)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n
            and "lm_head" not in n}


def input_maxima(model, linears: dict[str, torch.nn.Linear], prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Each layer's per-input-channel max |x| over the calibration prompts."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, inputs, _output):
            seen = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0)
            maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    with torch.inference_mode():
        for ids in prompts:
            model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return maxima


def group_of(name: str) -> str:
    for part, group in SHARED_INPUT.items():
        if name.endswith(part):
            return name[: -len(part)] + group
    return name


def smoothing(linears: dict[str, torch.nn.Linear], maxima: dict[str, torch.Tensor], alpha: float
              ) -> dict[str, torch.Tensor]:
    """Per layer, SmoothQuant's per-input-channel s (shared by the layers that read the same input)."""
    weight_max: dict[str, torch.Tensor] = {}
    for name, layer in linears.items():
        w = layer.weight.detach().abs().amax(0)
        g = group_of(name)
        weight_max[g] = torch.maximum(weight_max[g], w) if g in weight_max else w
    out = {}
    for name in linears:
        if name.split(".")[-1] in SMOOTHED:
            g = group_of(name)
            out[name] = (maxima[name].clamp(min=1e-5) ** alpha / weight_max[g].clamp(min=1e-5) ** (1 - alpha)
                         ).clamp(min=1e-5)
    return out


def int8_forward(layer: torch.nn.Linear, s: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The W8A8 product of `layer`: int8 weights per output channel, int8 activations per token."""
    w = layer.weight.detach() * (s if s is not None else 1.0)
    w_scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
    w_q = (w / w_scale).round().clamp(-127, 127)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x / s if s is not None else x
        x_scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        x_q = (x / x_scale).round().clamp(-127, 127)
        return (x_q @ w_q.T) * x_scale * w_scale.T
    return forward


def main(data: Path = typer.Option(Path("../shared/data/ml-1m"), exists=True, file_okay=False),
         adapter: Path = typer.Option(ML1M_ADAPTER, exists=True, file_okay=False),
         model_dir: Path = typer.Option(ROOT / "var/models/gemma-3-270m", exists=True, file_okay=False),
         prompts: int = typer.Option(40), calibration: int = typer.Option(16), seed: int = typer.Option(7),
         out: Path = typer.Option(ROOT / "benchmarks/results/int8_agreement.json")) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dataset = Dataset.read(data)
    codec = load_codec(model_dir)
    measured = recent_prompts(dataset, draw(dataset.parts["test"], prompts, seed), codec)
    calibrating = recent_prompts(dataset, draw(dataset.parts["train"], calibration, seed), codec)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    linears = base_linears(model)
    plain = {name: layer.forward for name, layer in linears.items()}
    maxima = input_maxima(model, linears, calibrating)
    started = time.perf_counter()
    reference = p_yes(model, measured, codec)
    seconds = time.perf_counter() - started
    figures: dict[str, dict] = {}
    for name, (alpha, kept, only) in VARIANTS.items():
        scales = smoothing(linears, maxima, alpha) if alpha is not None else {}
        for layer_name, layer in linears.items():
            part = layer_name.split(".")[-1]
            quantized = part not in kept and (only is None or part in only)
            layer.forward = int8_forward(layer, scales.get(layer_name)) if quantized else plain[layer_name]
        figures[name] = agreement(p_yes(model, measured, codec), reference)
        typer.echo(f"{name}: {figures[name]}")
    for layer_name, layer in linears.items():
        layer.forward = plain[layer_name]
    figures["bf16 weights and compute (the shipped dtype, for scale)"] = agreement(
        p_yes(model.to(torch.bfloat16), measured, codec), reference)
    report = {"what": "mean and max |dp| of P(Yes) against the fp32 model with the adapter, simulated W8A8 schemes",
              "bound_mean_abs_dp": BOUND, "adapter": adapter.name, "prompts": len(measured),
              "mean_prompt_tokens": round(float(np.mean([len(p) for p in measured])), 1),
              "calibration_prompts": len(calibrating), "reference_mean_p": round(float(reference.mean()), 4),
              "reference_seconds": round(seconds, 1), "variants": figures,
              "machine": machine(), "command": command()}
    save(out, report)


def agreement(scores: np.ndarray, reference: np.ndarray) -> dict:
    dp = np.abs(scores - reference)
    return {"mean_abs_dp": round(float(dp.mean()), 4), "max_abs_dp": round(float(dp.max()), 4),
            "within_bound": bool(dp.mean() < BOUND)}


if __name__ == "__main__":
    typer.run(main)
