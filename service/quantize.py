"""An int8 W8A8 copy of the served model for vLLM's CPU int8 kernels (oneDNN), made without data.

Weights: int8, symmetric, one scale per output channel (absmax / 127). Activations: int8, symmetric,
one scale per token, computed by the engine at run time (dynamic), so no calibration set is needed.
The embeddings and the output layer stay in the source dtype. The checkpoint is written in the
compressed-tensors format (`int-quantized`) that vLLM reads, through the compressed-tensors library.
LoRA adapters trained on the source model apply unchanged: they add to the layers' outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.config import EngineSettings

MARKER = "lorec-quantized.json"


def int8_dir(model_dir: Path) -> Path:
    return model_dir.with_name(model_dir.name + "-w8a8")


def engine_weights(engine: EngineSettings, model_dir: Path) -> Path:
    """The folder the engine serves: the model's own, or (LOREC_ENGINE_WEIGHTS=int8) its int8 copy, made once."""
    return quantize_int8(model_dir) if engine.weights == "int8" else model_dir


def quantize_int8(model_dir: Path, out: Path | None = None) -> Path:
    """Writes the W8A8 copy of `model_dir` (default: beside it, `<name>-w8a8`) once; its folder."""
    out = out or int8_dir(model_dir)
    if (out / MARKER).exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(
        "W8A8", ["Linear"])}, ignore=["lm_head"]))
    layers = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale"):
            absmax = module.weight.detach().abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
            module.weight_scale.data = (absmax / 127).to(module.weight_scale.dtype)
            module.weight_zero_point.data.zero_()
            layers += 1
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    compressor.update_config(str(staging))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({"source": model_dir.name, "scheme": "W8A8 (int8 per-channel "
                                              "weights, dynamic per-token activations)", "layers": layers}))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # atomic: a folder with the marker is complete
    return out
