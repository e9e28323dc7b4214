"""Ready means warm: the engine scores requests shaped like real ones before the gateway reports ready.

A fresh vLLM CPU engine pays for its first batches (kernel selection and compilation for new shapes,
the first LoRA batch): measured 50 s for the first 5-candidate request on a fresh `lorec up`. The
gateway therefore scores, on every engine replica, one batch of `candidates` prompts of `k` behaviours
(the request defaults) through the base model and through each adapter it serves from the start (the
default adapter, the cohort adapters), and only then reports ready (`/readyz`, `lorec_warm`, the log
line `ready after ...`). The prompts are synthetic, built by the prompt module like a user's: their
length and batch shape are a real request's, and no user's prefix cache is touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.prompt import PromptCodec, build_prompt
from service.records import Behaviour, Item, Profile
from service.scoring import AdapterLoadFailed, EngineClient, EngineError, EnginePool

log = logging.getLogger(__name__)
RETRY_S = 2.0  # between attempts while the engine is not up yet


@dataclass
class WarmupState:
    """Where the warm-up stands, for /readyz."""

    done: bool = False
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None  # how long it took, once done
    last_error: str | None = None
    batches: int = 0  # batches scored so far
    task: asyncio.Task | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.done:
            return "ok"
        return f"pending: {self.last_error}" if self.last_error else "pending"


def warmup_prompts(codec: PromptCodec, candidates: int, k: int, max_tokens: int) -> list[list[int]]:
    """`candidates` prompts of one synthetic user with `k` rated behaviours, like one real request."""
    genres = ("Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi")
    items = {str(i): Item(f"warmup-{i}", f"A Film About Number {i} and Its Long Title", 1990 + i % 10,
                          (genres[i % 6], genres[(i + 2) % 6])) for i in range(k + candidates)}
    profile = Profile(gender="female", age="25-34", occupation="engineer")
    behaviours = [Behaviour(str(i), 1_000 + i, float(1 + i % 5)) for i in range(k)]
    prompts = [codec.encode(build_prompt(profile, behaviours, items, items[str(k + c)])) for c in range(candidates)]
    return [p[-max_tokens:] for p in prompts]


async def warm_up(engine: EnginePool, adapters: list[tuple[str, Path]], prompts: list[list[int]],
                  state: WarmupState) -> None:
    """Score `prompts` on every replica through the base model and each adapter; retried until the engine
    answers (it may still be starting), then `state.done`."""
    for replica in engine.replicas:
        for name, path in [(None, None), *adapters]:
            while True:
                try:
                    if name is not None:
                        await replica.ensure_adapter(name, path)
                    await replica.score(prompts, name)
                    state.batches += 1
                    break
                except AdapterLoadFailed as refused:  # the engine answered: routing quarantines it on first use
                    log.warning("warm-up skips adapter %s: %s", name, refused)
                    break
                except EngineError as exc:
                    state.last_error = f"{replica.url} {name or 'base'}: {exc}"
                    await asyncio.sleep(RETRY_S)
    state.done, state.seconds, state.last_error = True, time.monotonic() - state.started, None
    log.info("ready after %.0fs: the engine scored %d warm-up batches of %d prompts (base model and %d adapters)",
             state.seconds, state.batches, len(prompts), len(adapters))


async def warm_engine(url: str, model_name: str, codec: PromptCodec, candidates: int, k: int, max_tokens: int,
                      alive) -> WarmupState:
    """`lorec engine`'s own warm-up of the base model, once its server answers (`alive()` false: the server
    exited, stop waiting); with no warm-up candidates, done once it answers."""
    state = WarmupState()
    prompts = warmup_prompts(codec, candidates, k, max_tokens)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=2)) as http:
        replica = EngineClient(http, model_name, codec.answer)
        while alive():
            try:
                await replica.ping()
                break
            except EngineError as exc:
                state.last_error = str(exc)
                await asyncio.sleep(RETRY_S)
        else:
            return state
        if not prompts:
            state.done = True
            return state
        await warm_up(EnginePool([replica]), [], prompts, state)
    return state
