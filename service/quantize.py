"""An int8 W8A8 copy of the served model for vLLM's CPU int8 kernels (oneDNN), made without data.

Weights: int8, symmetric, one scale per output channel (absmax / 127). Activations: int8, symmetric,
one scale per token, computed by the engine at run time (dynamic), so no calibration set is needed.
The embeddings and the output layer stay in the source dtype. The checkpoint is written in the
compressed-tensors format (`int-quantized`) that vLLM reads, through the compressed-tensors library.
LoRA adapters trained on the source model apply unchanged: they add to the layers' outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.model import INT8_MARKER, int8_dir, publish


def quantize_int8(model_dir: Path, out: Path | None = None) -> Path:
    """Writes the W8A8 copy of `model_dir` (default: beside it, `<name>-w8a8`) once; its folder."""
    out = out or int8_dir(model_dir)
    if (out / INT8_MARKER).exists():
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

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        compressor.update_config(str(folder))
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)

    publish(out, write, INT8_MARKER, {"source": model_dir.name, "layers": layers,
                                      "scheme": "W8A8 (int8 per-channel weights, dynamic per-token activations)"})
    return out
