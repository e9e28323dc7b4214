"""A bf16 engine (LOREC_ENGINE_DTYPE=bfloat16) with its answer logits in fp32 (the default head, the engine
plugin's `precise_head`): its scores agree with the fp32 engine's on the same prompts, and a LoRA adapter
changes them as it does through fp32."""

from __future__ import annotations

import random

import numpy as np
import pytest

from service.prompt import load_codec
from tests.utils.stack import engine_scores, make_settings, start_engine

ADAPTER = "tiny-random-v1"


@pytest.fixture(scope="module")
def bf16_engine(workdir, tiny_model, redis_url):
    settings = make_settings(workdir, tiny_model, redis_url, engine_dtype="bfloat16")
    engine, url = start_engine(settings, tiny_model, workdir / "logs" / "vllm-bf16.log")
    yield url
    engine.stop()


def test_bf16_engine_agrees_with_fp32_and_lora_changes_it_alike(tiny_engine, bf16_engine, tiny_model, adapter_dir,
                                                                 workdir):
    answer = load_codec(tiny_model).answer
    log = (workdir / "logs" / "vllm-bf16.log").read_text()
    assert f"the logits of tokens [{answer.yes}, {answer.no}] are computed in fp32" in log
    codec = load_codec(tiny_model)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(10, 900) for _ in range(60)] for _ in range(12)]
    fp32 = {a: engine_scores(tiny_engine, codec, prompts, adapter_dir, a) for a in (None, ADAPTER)}
    bf16 = {a: engine_scores(bf16_engine, codec, prompts, adapter_dir, a) for a in (None, ADAPTER)}
    for adapter in (None, ADAPTER):
        deltas = [abs(x - y) for x, y in zip(fp32[adapter], bf16[adapter])]
        print(f"\n{adapter or 'base'}: mean |dp| {np.mean(deltas):.6f}, max {max(deltas):.6f}")
        assert np.mean(deltas) < 0.01 and max(deltas) < 0.03, "the issue's bound: mean |dp| < 0.01"
    effect_fp32 = np.subtract(fp32[ADAPTER], fp32[None])
    effect_bf16 = np.subtract(bf16[ADAPTER], bf16[None])
    assert np.abs(effect_fp32).max() > 0.05, "the adapter moves the scores"
    assert float(np.corrcoef(effect_fp32, effect_bf16)[0, 1]) > 0.99, "and moves them alike in bf16"
