"""In-memory fakes of lorec's own interfaces, for fast tests of the request flow (no Redis, Qdrant or vLLM).

Only the project's own seams are faked (the history store's reads, the item index, the engine pool, the
tokenizer and the CRM); the service object, the router, the features stage's pure parts, the prompt
template and the combiner are the real ones.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from service.feature_vector import BUCKETS, FeatureSpec, ItemStats, bucket
from service.records import Behaviour, Item, Profile, UserContext
from service.scoring import AdapterLoadFailed, AnswerLogprobs, EngineError


class WordTokenizer:
    """Each word with its leading space is one token (so " Yes" after "Answer:" is one token)."""

    pad_token_id = 0

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [self.vocab.setdefault(word, len(self.vocab) + 1) for word in re.findall(r"\s?\S+", text)]
        return {"input_ids": ([1_000_000] if add_special_tokens else []) + ids}


class FakeHistory:
    """The history store's reads over dicts: users' events (time order), profiles, the catalog."""

    def __init__(self, items: Iterable[Item], events: dict[str, list[Behaviour]],
                 profiles: dict[str, Profile] | None = None) -> None:
        self.catalog = {i.item_id: i for i in items}
        self.events = {u: sorted(bs, key=lambda b: b.ts) for u, bs in events.items()}
        self.profiles = profiles or {}
        self.redis = None

    async def load_request(self, user_id: str, item_ids: Sequence[str], as_of: int | None
                           ) -> tuple[UserContext, dict[str, Item | None]]:
        seen = [b for b in self.events.get(user_id, []) if as_of is None or b.ts < as_of]
        return (UserContext.of(user_id, self.profiles.get(user_id, Profile()), seen),
                {i: self.catalog.get(i) for i in item_ids})

    async def items(self, item_ids: Iterable[str]) -> dict[str, Item | None]:
        return {i: self.catalog.get(i) for i in item_ids}

    async def item_stats(self, item_ids: Sequence[str], as_of: int | None, now: int) -> dict[str, ItemStats]:
        out = {}
        for item_id in item_ids:
            ratings = [b for bs in self.events.values() for b in bs
                       if b.item_id == item_id and (as_of is None or b.ts < as_of)]
            counts = tuple(sum(bucket(b.rating) == name for b in ratings) for name in BUCKETS)
            out[item_id] = ItemStats(counts, sum(b.ts >= now - 30 * 86_400 for b in ratings),
                                     min((b.ts for b in ratings), default=None))
        return out


class FakeIndex:
    """Item vectors in a dict; nearest by cosine; `fail` raises on searches (a dead or hung Qdrant)."""

    dim = 2

    def __init__(self, vectors: dict[str, np.ndarray], fail: BaseException | None = None) -> None:
        self._vectors = {k: v / np.linalg.norm(v) for k, v in vectors.items()}
        self.fail = fail

    async def vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        self._check()
        return {i: self._vectors[i] for i in item_ids if i in self._vectors}

    async def nearest_within(self, queries: np.ndarray, allowed: Sequence[str], k: int
                             ) -> list[list[tuple[str, float]]]:
        self._check()
        out = []
        for q in queries:
            scored = sorted(((i, float(self._vectors[i] @ q)) for i in allowed if i in self._vectors),
                            key=lambda x: -x[1])
            out.append(scored[:k])
        return out

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def ping(self) -> None:
        self._check()

    async def close(self) -> None:
        pass


class FakeEngine:
    """The engine pool: P(Yes) from the prompt's length and the adapter's name; records every call; can be
    made to fail (`error`), to hang (`delay_s`) or to refuse adapters (`refuse`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None]] = []
        self.loaded: set[str] = set()
        self.refuse: set[str] = set()
        self.error: EngineError | None = None
        self.delay_s = 0.0

    @staticmethod
    def logit(prompt: Sequence[int], adapter: str | None) -> float:
        return (len(prompt) % 7 - 3) / 3 + (0.5 if adapter else 0.0)

    url = "fake-engine"

    @property
    def replicas(self) -> list[FakeEngine]:  # one replica: itself
        return [self]

    async def score(self, prompts: list[list[int]], adapter: str | None, affinity: str = "") -> list[AnswerLogprobs]:
        self.calls.append((len(prompts), adapter))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        out = []
        for prompt in prompts:
            x = self.logit(prompt, adapter)
            out.append(AnswerLogprobs(yes=-float(np.log1p(np.exp(-x))), no=-float(np.log1p(np.exp(x)))))
        return out

    async def ensure_adapter(self, name: str, path: Path) -> None:
        if name in self.refuse:
            raise AdapterLoadFailed(f"engine could not load adapter {name!r}: refused")
        self.loaded.add(name)

    async def unload_adapter(self, name: str) -> None:
        self.loaded.discard(name)

    @property
    def loaded_adapters(self) -> set[str]:
        return set(self.loaded)

    async def ping(self) -> None:
        if self.error is not None:
            raise self.error


class FakeCrm:
    """A CRM whose logit is a fixed linear function of two features (the item's and the user's mean)."""

    def __init__(self, spec: FeatureSpec, name: str = "fake-crm", version: str = "000000000001") -> None:
        self.spec, self.name, self.version = spec, name, version
        names = list(spec.names)
        self._i, self._u = names.index("i_mean"), names.index("u_mean")
        self.calls = 0

    def logits(self, features: np.ndarray) -> np.ndarray:
        self.calls += 1
        return 2.0 * (features[:, self._i] - 3.5) + (features[:, self._u] - 3.5)

    def user_vectors(self, users: np.ndarray) -> np.ndarray:
        return users
