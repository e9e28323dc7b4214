"""Through the real model: Gemma 3 270M (from the PyPI GGUF package) served by vLLM."""

from __future__ import annotations

import math
import random
import shutil

import numpy as np
import pytest

from service.prompt import load_codec
from tests.utils.stack import AUTH, engine_scores, make_settings, start_engine

pytestmark = pytest.mark.gemma


def test_answer_tokens_come_from_the_gemma_tokenizer(gemma_model):
    codec = load_codec(gemma_model)
    assert (codec.answer.yes, codec.answer.no) == (8438, 2301)
    assert codec.tokenizer.decode([codec.answer.yes]) == " Yes"


def test_rank_through_gemma(gemma_engine, gemma_model, tiny_settings, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app

    # Same Redis data and item vectors as the tiny-model tests (a copy of the data folder: one
    # process at a time may open a Qdrant Edge shard); the LLM that scores is Gemma.
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_settings.data_dir, data_dir, ignore=shutil.ignore_patterns("*.lock"))
    settings = tiny_settings.replace(**{"model": gemma_model, "engine_url": gemma_engine,
                                                "data_dir": data_dir})
    items = [str(i) for i in range(1, 21)]
    with TestClient(create_app(settings), headers=AUTH) as client:
        response = client.post("/v1/rank", json={"user_id": "1", "item_ids": items, "top_k": 20})
        assert response.status_code == 200, response.text
        ranked = response.json()["items"]
        ctr = client.post("/v1/ctr", json={"user_id": "1", "item_ids": items}).json()["scores"]
    assert sorted(s["item_id"] for s in ranked) == sorted(items)
    assert [s["score"] for s in ranked] == sorted((s["score"] for s in ranked), reverse=True)
    for s in ranked:
        yes, no = math.exp(s["logprob_yes"]), math.exp(s["logprob_no"])
        assert s["score"] == pytest.approx(yes / (yes + no), rel=1e-9)
    by_item = {s["item_id"]: s["score"] for s in ctr}
    # The second call reads the prompts' prefixes from vLLM's cache: same prompts, other kernels,
    # fp32 differences in the last digits (measured up to 3e-6 with Gemma).
    assert [by_item[s["item_id"]] for s in ranked] == pytest.approx([s["score"] for s in ranked], abs=2e-5)
    # Gemma puts real mass on the answer tokens and tells candidates apart.
    assert max(s["logprob_yes"] for s in ranked) > -8 and max(s["logprob_no"] for s in ranked) > -8
    assert max(s["score"] for s in ranked) - min(s["score"] for s in ranked) > 1e-3


def test_gemma_runs_the_fused_cpu_kernels_and_scores_as_the_native_ops(gemma_engine, gemma_model, workdir,
                                                                        redis_url, adapter_dir):
    """The default engine (LOREC_ENGINE_OPS=fused) against one with vLLM's native ops, same prompts."""
    assert "first Gemma RMSNorm through the fused CPU kernel" in (workdir / "logs" / "vllm-gemma.log").read_text()
    settings = make_settings(workdir, gemma_model, redis_url, engine_ops="native")
    engine, native_url = start_engine(settings, gemma_model, workdir / "logs" / "vllm-gemma-native-ops.log")
    try:
        rng, codec = random.Random(1), load_codec(gemma_model)
        prompts = [[2] + [rng.randrange(100, 20000) for _ in range(80)] for _ in range(12)]
        native = np.array(engine_scores(native_url, codec, prompts, adapter_dir, None))
    finally:
        engine.stop()
    assert "fused CPU kernel" not in (workdir / "logs" / "vllm-gemma-native-ops.log").read_text()
    fused = np.array(engine_scores(gemma_engine, codec, prompts, adapter_dir, None))
    deltas = np.abs(fused - native)
    print(f"\n{settings.engine.dtype}: mean |dp| {deltas.mean():.6f}, max {deltas.max():.6f}")
    if settings.engine.dtype == "float32":  # the same arithmetic: summation order only
        assert deltas.max() < 1e-4
    else:  # (1 + w) rounded to bf16: the agreement bound
        assert deltas.mean() < 0.01 and deltas.max() < 0.03
    assert np.ptp(native) > 1e-3, "the prompts' scores differ, so agreement says something"
