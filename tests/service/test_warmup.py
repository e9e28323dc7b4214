"""Ready means warm (service/warmup.py): the engine scores request-shaped batches through the base model and
each start adapter before the gateway reports ready; an engine still starting is waited for."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service import warmup
from service.prompt import PromptCodec
from service.scoring import EngineError
from service.warmup import WarmupState, warm_up, warmup_prompts
from tests.utils.fakes import FakeEngine, WordTokenizer


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

