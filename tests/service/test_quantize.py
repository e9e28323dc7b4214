"""The int8 W8A8 model (service/quantize.py) served by a real vLLM engine: its scores agree with the fp32
engine's on the same prompts, and a LoRA adapter changes them as it does through fp32."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from service.prompt import load_codec
from service.quantize import quantize_int8
from tests.utils.stack import engine_agreement, make_settings, start_engine

ADAPTER = "tiny-random-v1"


@pytest.fixture(scope="module")
def int8_model(tiny_model):
    return quantize_int8(tiny_model)


@pytest.fixture(scope="module")
def int8_engine(workdir, tiny_model, int8_model, redis_url):
    """The engine of LOREC_ENGINE_WEIGHTS=int8: it serves the int8 copy beside the model."""
    settings = make_settings(workdir, tiny_model, redis_url, engine_weights="int8")
    engine, url = start_engine(settings, tiny_model, workdir / "logs" / "vllm-int8.log")
    assert engine.process.args[engine.process.args.index("--model") + 1] == str(int8_model)
    yield url
    engine.stop()


def test_linear_weights_are_int8_with_a_scale_per_channel(int8_model, tiny_model):
    config = json.loads((int8_model / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    with safe_open(str(int8_model / "model.safetensors"), "pt") as weights:
        q = weights.get_tensor("model.layers.0.self_attn.q_proj.weight")
        scale = weights.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        assert str(q.dtype) == "torch.int8" and tuple(scale.shape) == (q.shape[0], 1)
        assert str(weights.get_tensor("model.embed_tokens.weight").dtype) == "torch.float32"
    assert quantize_int8(tiny_model) == int8_model and int8_model.name == "tiny-llama-w8a8", "made once, beside it"


def test_int8_engine_agrees_with_fp32_and_lora_changes_it_alike(tiny_engine, int8_engine, tiny_model,
                                                                 adapter_dir):
    # The random tiny model is harsher on int8 than Gemma (no trained weight structure): 0.017 mean |dp| for
    # the base model here; Gemma's agreement on real prompts is benchmarks/engine_settings.py's to measure.
    agreement = engine_agreement(tiny_engine, int8_engine, load_codec(tiny_model), adapter_dir, ADAPTER)
    for adapter in (None, ADAPTER):
        assert agreement.mean_dp[adapter] < 0.03 and agreement.max_dp[adapter] < 0.08
    assert agreement.reference_effect > 0.05, "the adapter moves the scores"
    assert agreement.effect_correlation > 0.9, "and moves them alike through int8"
