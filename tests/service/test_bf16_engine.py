"""A bf16 engine (LOREC_ENGINE_DTYPE=bfloat16) with its answer logits in fp32 (the default head, the engine
plugin's `precise_head`): its scores agree with the fp32 engine's on the same prompts, and a LoRA adapter
changes them as it does through fp32."""

from __future__ import annotations

import pytest

from service.prompt import load_codec
from tests.utils.stack import engine_agreement, make_settings, start_engine

ADAPTER = "tiny-random-v1"


@pytest.fixture(scope="module")
def bf16_engine(workdir, tiny_model, redis_url):
    settings = make_settings(workdir, tiny_model, redis_url, engine_dtype="bfloat16")
    engine, url = start_engine(settings, tiny_model, workdir / "logs" / "vllm-bf16.log")
    yield url
    engine.stop()


def test_bf16_engine_agrees_with_fp32_and_lora_changes_it_alike(tiny_engine, bf16_engine, tiny_model, adapter_dir,
                                                                 workdir):
    codec = load_codec(tiny_model)
    log = (workdir / "logs" / "vllm-bf16.log").read_text()
    assert f"the logits of tokens [{codec.answer.yes}, {codec.answer.no}] are computed in fp32" in log
    agreement = engine_agreement(tiny_engine, bf16_engine, codec, adapter_dir, ADAPTER)
    for adapter in (None, ADAPTER):
        assert agreement.mean_dp[adapter] < 0.01 and agreement.max_dp[adapter] < 0.03, "the issue's bound"
    assert agreement.reference_effect > 0.05, "the adapter moves the scores"
    assert agreement.effect_correlation > 0.99, "and moves them alike in bf16"
