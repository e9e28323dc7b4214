"""Scoring samples through the running gateway, as a product backend calls it: one `/v1/ctr` request per
sample at `as_of` its own time (no later behaviour leaks into its prompt), or one per slate.

Dependency faults (503/504) are retried after a pause; any other error fails the evaluation. A journal
(journal.py) keeps each score as it arrives, so a cut-short evaluation goes on where it stopped.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from adapters.journal import Journal
from adapters.samples import Sample

RETRIED = (503, 504)  # the gateway's dependency faults: transient, so worth another try
RETRY_WAITS_S = (1.0, 4.0, 15.0)  # one long evaluation must not be lost to one engine hiccup


async def _post(client: httpx.AsyncClient, body: dict, what: str) -> dict:
    """POST /v1/ctr, retrying dependency faults (503/504) after each wait in RETRY_WAITS_S; any other error,
    or a fault that outlasts the waits, fails the evaluation naming `what`."""
    for wait_s in (*RETRY_WAITS_S, None):
        response = await client.post("/v1/ctr", json=body)
        if response.status_code not in RETRIED or wait_s is None:
            break
        await asyncio.sleep(wait_s)
    if response.status_code != 200:
        raise RuntimeError(f"gateway answered {response.status_code} for {what}: {response.text[:300]}")
    return response.json()


@dataclass
class GatewayScores:
    scores: list[float]
    prompts: list[list[int]]
    adapters: dict[str, int]  # adapter mode that served -> samples (fallbacks show here)
    resumed: int = 0  # samples read back from the journal instead of asked again
    seconds: float = 0.0  # time at the gateway, the journal's earlier runs included
    components: list[dict] = field(default_factory=list)  # per sample {"llm": p, "crm": p} (explain)
    scorers: dict[str, int] = field(default_factory=dict)  # scorer that served -> samples


async def score_via_gateway(base_url: str, samples: Sequence[Sample], adapter: str | None, k: int, retrieval: str,
                            concurrency: int = 8, api_key: str | None = None, timeout_s: float = 600,
                            mode: str | None = None, journal: Journal | None = None,
                            scorer: str | None = None) -> GatewayScores:
    """One request per sample at its own `as_of`; `concurrency` requests in flight so the engine batches.
    `mode` (personal, cohort, shared) asks for an adapter mode instead of the adapter `adapter` (None: the
    gateway's default); `scorer` (hybrid, llm, crm) for a scorer (None: the gateway's default). Every request
    asks for `explain`, so each component's score comes back beside the served one.
    With a `journal`, samples it already holds are not asked again and new scores are appended to it."""
    choice = {"mode": mode} if mode else {"adapter": adapter} if adapter else {}
    choice |= {"scorer": scorer} if scorer else {}
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    done = journal.rows if journal else {}
    scores = [done[i]["score"] if i in done else 0.0 for i in range(len(samples))]
    prompts = [done[i]["prompt"] if i in done else [] for i in range(len(samples))]
    components = [done[i]["components"] if i in done else {} for i in range(len(samples))]
    served_by: dict[str, int] = defaultdict(int)
    scorers: dict[str, int] = defaultdict(int)
    for row in done.values():
        served_by[row["served_by"]] += 1
        scorers[row["scorer"]] += 1
    started = time.monotonic()
    with journal.appender() if journal else nullcontext() as record:
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers) as client:
            progress = tqdm(total=len(samples), initial=len(done), desc=f"gateway {mode or adapter}", unit="sample")

            async def one(i: int, s: Sample) -> None:
                async with limit:
                    body = await _post(client, {
                        "user_id": s.user_id, "item_ids": [s.item_id], "as_of": s.ts,
                        "options": {**choice, "k": k, "retrieval": retrieval, "return_prompt": True,
                                    "explain": True}}, f"sample {i}")
                item = body["scores"][0]
                scores[i], prompts[i] = item["score"], item.get("prompt_token_ids") or []
                components[i] = item.get("components") or {}
                served_by[body["adapter_mode"]] += 1
                scorers[body.get("scorer", "llm")] += 1
                if record:
                    record(i, s, scores[i], prompts[i], body["adapter_mode"], components[i],
                           body.get("scorer", "llm"))
                progress.update(1)

            await asyncio.gather(*(one(i, s) for i, s in enumerate(samples) if i not in done))
            progress.close()
    return GatewayScores(scores, prompts, dict(served_by), resumed=len(done),
                         seconds=(journal.seconds if journal else 0.0) + time.monotonic() - started,
                         components=components, scorers=dict(scorers))


def slates(pool: Sequence[Sample], n_slates: int, size: int, seed: int) -> list[list[Sample]]:
    """Test samples grouped as a ranking request carries them: one user's consecutive samples in time
    order, up to `size` distinct items a slate; `n_slates` of them drawn with a fixed seed."""
    by_user: dict[str, list[Sample]] = defaultdict(list)
    for sample in sorted(pool, key=lambda s: (s.user_id, s.ts, s.item_id)):
        if sample.item_id not in {s.item_id for s in by_user[sample.user_id]}:
            by_user[sample.user_id].append(sample)
    chunks = [samples[i:i + size] for _, samples in sorted(by_user.items()) for i in range(0, len(samples), size)]
    return random.Random(seed).sample(chunks, min(n_slates, len(chunks)))


async def score_slates_via_gateway(base_url: str, groups: Sequence[Sequence[Sample]], adapter: str, k: int,
                                   retrieval: str, concurrency: int = 2, api_key: str | None = None,
                                   timeout_s: float = 1800) -> list[list[float]]:
    """One request per slate at `as_of` its earliest sample: no behaviour of the slate, or later, leaks."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    scores: list[list[float]] = [[] for _ in groups]
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers) as client:
        progress = tqdm(total=len(groups), desc=f"gateway slates {retrieval}", unit="slate")

        async def one(i: int, group: Sequence[Sample]) -> None:
            async with limit:
                body = await _post(client, {
                    "user_id": group[0].user_id, "item_ids": [s.item_id for s in group],
                    "as_of": min(s.ts for s in group), "options": {"adapter": adapter, "k": k,
                                                                  "retrieval": retrieval}}, f"slate {i}")
            scores[i] = [s["score"] for s in body["scores"]]
            progress.update(1)

        await asyncio.gather(*(one(i, g) for i, g in enumerate(groups)))
        progress.close()
    return scores


