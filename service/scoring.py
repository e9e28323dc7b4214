"""Stage 7, scoring: P(Yes) from the vLLM engine.

One `/v1/completions` call per request carries every candidate's prompt (as
token ids, so the engine sees exactly what the trainer saw), `max_tokens=1`
and `logprob_token_ids=[yes, no]`: the engine returns the log-probabilities
of both answer tokens at the first generated position, whatever the top-k.
P(Yes) = exp(lp_yes) / (exp(lp_yes) + exp(lp_no)).

Adapters load through `/v1/load_lora_adapter` the first time a name is used;
concurrent requests for one new adapter share a single load.

Several engine replicas (`LOREC_ENGINE_URL` lists them, comma-separated) form an
`EnginePool`: each adapter — or, for the base model, each user — has a home
replica by rendezvous hashing, so its weights and its prefix cache stay hot in
one place; a replica that cannot be reached is skipped for a few seconds and the
key's next replica serves (loading the adapter there first).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.prompt import AnswerTokens


class EngineError(Exception):
    """The engine could not answer: unreachable, too slow, or an error response."""

    def __init__(self, message: str, timeout: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.unreachable = unreachable


class AdapterLoadFailed(EngineError):
    """The engine answered but would not load the adapter (missing, corrupt, incompatible)."""


@dataclass(frozen=True, slots=True)
class AnswerLogprobs:
    yes: float
    no: float

    @property
    def p_yes(self) -> float:
        return p_yes(self.yes, self.no)


def p_yes(lp_yes: float, lp_no: float) -> float:
    """Two-way softmax, computed as a logistic of the difference (no overflow)."""
    diff = lp_no - lp_yes
    if diff > 0:
        e = math.exp(-diff)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(diff))


def parse_answer_logprobs(body: dict, answer: AnswerTokens, n: int) -> list[AnswerLogprobs]:
    choices = sorted(body["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise EngineError(f"engine returned {len(choices)} choices for {n} prompts")
    out = []
    for choice in choices:
        first = choice["logprobs"]["top_logprobs"][0]
        try:
            out.append(AnswerLogprobs(yes=first[f"token_id:{answer.yes}"], no=first[f"token_id:{answer.no}"]))
        except KeyError as missing:
            raise EngineError(f"engine response lacks the answer token {missing}") from None
    return out


class EngineClient:
    def __init__(self, http: httpx.AsyncClient, base_model: str, answer: AnswerTokens, on_load=None) -> None:
        self.http = http
        self.base_model = base_model
        self.answer = answer
        self._loaded: set[str] = set()
        self._loading: dict[str, asyncio.Task] = {}
        self._on_load = on_load or (lambda outcome: None)

    @property
    def url(self) -> str:
        return str(self.http.base_url).rstrip("/")  # httpx adds a trailing slash to base URLs

    @property
    def loaded_adapters(self) -> set[str]:
        return set(self._loaded)

    async def _post(self, path: str, payload: dict) -> httpx.Response:
        try:
            return await self.http.post(path, json=payload)
        except httpx.TimeoutException as exc:
            raise EngineError(f"engine timed out on {path}", timeout=True) from exc
        except httpx.TransportError as exc:
            raise EngineError(f"engine unreachable: {exc.__class__.__name__}", unreachable=True) from exc

    async def score(self, prompts: list[list[int]], adapter: str | None) -> list[AnswerLogprobs]:
        payload = {
            "model": adapter or self.base_model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 1,
            "logprob_token_ids": [self.answer.yes, self.answer.no],
            "return_tokens_as_token_ids": True,
        }
        response = await self._post("/v1/completions", payload)
        if response.status_code == 404 and adapter is not None:
            # The engine lost the adapter (restarted): load it again on the next request.
            self._loaded.discard(adapter)
        if response.status_code != 200:
            raise EngineError(f"engine answered {response.status_code}: {response.text[:300]}")
        return parse_answer_logprobs(response.json(), self.answer, len(prompts))

    async def ensure_adapter(self, name: str, path: Path) -> None:
        if name in self._loaded:
            return
        task = self._loading.get(name)
        if task is None:  # first caller starts the load; the others await the same task
            task = asyncio.create_task(self._load(name, path))
            self._loading[name] = task
            task.add_done_callback(lambda _: self._loading.pop(name, None))
        await asyncio.shield(task)

    async def _load(self, name: str, path: Path) -> None:
        response = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        already = response.status_code == 400 and "already been loaded" in response.text
        if response.status_code != 200 and not already:
            self._on_load("error")
            raise AdapterLoadFailed(f"engine could not load adapter {name!r}: {response.text[:300]}")
        self._loaded.add(name)
        self._on_load("loaded" if not already else "already_loaded")

    async def unload_adapter(self, name: str) -> None:
        """Best effort: an adapter evicted from the personal cache leaves the engine too."""
        self._loaded.discard(name)
        try:
            await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except EngineError:
            pass

    async def ping(self) -> None:
        try:
            response = await self.http.get("/health")
        except httpx.HTTPError as exc:
            raise EngineError(f"engine unreachable: {exc.__class__.__name__}") from exc
        if response.status_code != 200:
            raise EngineError(f"engine health answered {response.status_code}")


class EnginePool:
    """The engine replicas, each key (adapter name, else user id) served by its home replica."""

    def __init__(self, replicas: list[EngineClient], retry_after_s: float = 5.0) -> None:
        self.replicas = replicas
        self.retry_after_s = retry_after_s
        self._down_until: dict[str, float] = {}
        self._paths: dict[str, Path] = {}

    def order(self, key: str) -> list[EngineClient]:
        """Rendezvous (highest random weight) order: the home replica first, then where it fails over to.
        Adding or losing a replica moves only the keys whose home it is."""
        return sorted(self.replicas, key=lambda r: hashlib.sha1(f"{r.url}|{key}".encode()).digest(), reverse=True)

    def _candidates(self, key: str) -> list[EngineClient]:
        now = time.monotonic()
        ordered = self.order(key)
        up = [r for r in ordered if self._down_until.get(r.url, 0.0) <= now]
        return up or ordered  # every replica recently down: try them all again

    async def _on_first_reachable(self, key: str, call):
        failure: EngineError | None = None
        for replica in self._candidates(key):
            try:
                return await call(replica)
            except EngineError as exc:
                if not exc.unreachable:  # an answer (an error, a refused adapter): not the replica's death
                    raise
                self._down_until[replica.url] = time.monotonic() + self.retry_after_s
                failure = exc
        raise failure or EngineError("no engine replica configured")

    async def score(self, prompts: list[list[int]], adapter: str | None, affinity: str) -> list[AnswerLogprobs]:
        async def on(replica: EngineClient) -> list[AnswerLogprobs]:
            if adapter is not None:
                await replica.ensure_adapter(adapter, self._paths[adapter])
            return await replica.score(prompts, adapter)

        return await self._on_first_reachable(adapter or affinity, on)

    async def ensure_adapter(self, name: str, path: Path) -> None:
        self._paths[name] = path
        await self._on_first_reachable(name, lambda replica: replica.ensure_adapter(name, path))

    async def unload_adapter(self, name: str) -> None:
        self._paths.pop(name, None)
        await asyncio.gather(*(r.unload_adapter(name) for r in self.replicas if name in r.loaded_adapters))

    @property
    def loaded_adapters(self) -> set[str]:
        return set().union(*(r.loaded_adapters for r in self.replicas))

    def home(self, key: str) -> str:
        return self.order(key)[0].url

    async def ping(self) -> None:
        """Ready while one replica answers; when none does, the error names them all."""
        outcomes = await asyncio.gather(*(r.ping() for r in self.replicas), return_exceptions=True)
        down = [r.url for r, o in zip(self.replicas, outcomes) if isinstance(o, Exception)]
        if len(down) == len(self.replicas):
            raise EngineError(f"engine unreachable: {', '.join(down)}", unreachable=True)
