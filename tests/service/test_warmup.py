"""Ready means warm (service/warmup.py): the engine scores request-shaped batches through the base model and
each start adapter before the gateway reports ready; an engine still starting is waited for."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from service import warmup
from service.app import create_app
from service.processes import Managed, free_port
from service.prompt import PromptCodec
from service.scoring import EngineError
from service.stack import ENGINE_START_TIMEOUT_S, LOREC
from service.warmup import WarmupState, warm_up, warmup_prompts
from tests.utils.fakes import FakeEngine, WordTokenizer
from tests.utils.http import post
from tests.utils.metrics import metric_total
from tests.utils.stack import AUTH


def test_warmup_prompts_have_the_shape_of_a_request():
    prompts = warmup_prompts(PromptCodec(WordTokenizer()), candidates=20, k=10, max_tokens=10_000)
    assert len(prompts) == 20 and len({tuple(p) for p in prompts}) == 20
    # one user's request: a shared history head, then one target each
    head = min(len(p) for p in prompts) - 20
    assert head > 100 and all(p[:head] == prompts[0][:head] for p in prompts)
    assert all(len(p) <= 64 for p in warmup_prompts(PromptCodec(WordTokenizer()), 20, 10, max_tokens=64))


def test_each_start_adapter_and_the_base_model_score_a_batch():
    engine = FakeEngine()
    engine.refuse.add("broken")
    state = WarmupState()
    adapters = [("shared-a", Path("a")), ("broken", Path("b")), ("cohort-1", Path("c"))]
    asyncio.run(warm_up(engine, adapters, [[1, 2, 3]] * 20, state))
    assert engine.calls == [(20, None), (20, "shared-a"), (20, "cohort-1")], "refused adapters are skipped"
    assert state.done and state.describe() == "ok" and state.batches == 3


def test_an_engine_still_starting_is_waited_for(monkeypatch):
    monkeypatch.setattr(warmup, "RETRY_S", 0.01)
    engine = FakeEngine()
    engine.error = EngineError("engine unreachable: ConnectError", unreachable=True)
    state = WarmupState()

    async def scenario() -> list[str]:
        task = asyncio.create_task(warm_up(engine, [], [[1]], state))
        await asyncio.sleep(0.05)
        seen = [state.describe()]
        engine.error = None
        await asyncio.wait_for(task, 5)
        return seen + [state.describe()]

    pending, done = asyncio.run(scenario())
    assert pending == "pending: fake-engine base: engine unreachable: ConnectError" and done == "ok"
    assert state.seconds is not None and state.seconds > 0



def _successes(engine_url: str) -> float:
    return metric_total(httpx.get(f"{engine_url}/metrics", timeout=10).text, "vllm:request_success_total")


def test_the_gateway_is_ready_only_after_the_engine_scored_the_warmup(tiny_settings, tiny_engine, tmp_path):
    """At the first 200 of /readyz the engine has already scored the warm-up through the base model and the
    default adapter (a name it never loaded); the first request afterwards costs what the second does."""
    name = f"warm-{time.time_ns()}"
    shutil.copytree(tiny_settings.registry_dir / "tiny-random-v1", tiny_settings.registry_dir / name)
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_settings.data_dir, data_dir, ignore=shutil.ignore_patterns("*.lock"))
    settings = tiny_settings.replace(**{"data_dir": data_dir, "default_adapter": name})
    before = _successes(tiny_engine)
    with TestClient(create_app(settings), headers=AUTH) as client:
        statuses = []
        while not statuses or statuses[-1] != 200:
            response = client.get("/readyz")
            statuses.append(response.status_code)
            assert statuses[-1] == 200 or response.json()["warmup"].startswith("pending"), response.text
            served = _successes(tiny_engine) - before
        assert served >= 2 * settings.engine.warmup_candidates, "ready before the warm-up was scored"
        assert name in {m["id"] for m in httpx.get(f"{tiny_engine}/v1/models", timeout=10).json()["data"]}

        def timed(user: str) -> float:
            start = time.perf_counter()
            body = post(client, "/v1/rank", {"user_id": user, "item_ids": [str(i) for i in range(1, 21)]})
            assert body["adapter"] == name
            return time.perf_counter() - start

        first, second = timed("2"), timed("3")  # two users: no prefix cache helps the second
    assert first <= 2 * second + 0.5, (first, second)


def test_lorec_engine_marks_ready_after_its_warmup(tiny_model, tmp_path):
    port, ready = free_port(), tmp_path / "engine-warm"
    ready.touch()  # a stale mark from an earlier run is removed at start
    env = {**os.environ, "LOREC_MODEL": str(tiny_model), "LOREC_DATA_DIR": str(tmp_path / "data"),
           "LOREC_ENGINE_KV_CACHE_GIB": "1", "LOREC_ENGINE_MAX_MODEL_LEN": "4096"}
    engine = Managed("lorec engine", [LOREC, "engine", "--port", str(port), "--ready-file", str(ready)],
                     tmp_path / "engine.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while ready.exists():  # until lorec engine removes the stale mark
            assert engine.alive() and time.monotonic() < deadline, engine.tail()
            time.sleep(0.1)
        while not ready.exists():
            assert engine.alive() and time.monotonic() < deadline, engine.tail()
            time.sleep(0.2)
        assert _successes(url) >= 20, "marked ready before the warm-up batch was scored"
    finally:
        engine.stop()
    assert engine.process.returncode is not None
