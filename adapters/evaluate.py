"""Evaluation: AUC, LogLoss and accuracy on a split, through the running gateway and offline.

Through the gateway, each sample is one `/v1/ctr` request at `as_of` its own
timestamp, so no later behaviour leaks into its prompt. Offline, the same
samples are scored with transformers + peft from prompts built by the same
modules. The two must agree (mean |delta p| < 0.01); where they do not, the
report lists the samples that differ most.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from adapters.samples import Sample
from adapters.train import metrics

AGREEMENT = 0.01
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


class JournalMismatch(ValueError):
    """The journal belongs to another evaluation (other samples, adapter, options or code)."""


@dataclass
class Journal:
    """Each gateway score appended as it arrives (JSON lines after a header naming the evaluation), so a
    10,000-sample evaluation cut short goes on where it stopped instead of starting over."""

    path: Path
    key: dict
    rows: dict[int, dict] = field(default_factory=dict)
    seconds: float = 0.0  # the earlier runs' time at the gateway

    def load(self, samples: Sequence[Sample]) -> None:
        """Read what an earlier run scored, checking each row is the same sample; drop a line cut by a kill."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        complete = text[:text.rfind("\n") + 1]  # a run killed mid-write leaves a partial last line
        if complete != text:
            self.path.write_text(complete)
        lines = complete.splitlines()
        if not lines:
            return
        if lines[0] != json.dumps(self.key, sort_keys=True):
            raise JournalMismatch(f"{self.path} holds another evaluation ({lines[0][:300]}): remove it to start over")
        segments: dict[int, float] = defaultdict(float)
        for number, line in enumerate(lines[1:], start=2):
            row = self._row(line, number)
            sample = samples[row["i"]] if 0 <= row["i"] < len(samples) else None
            if sample is None or [sample.user_id, sample.item_id, sample.ts] != row["sample"]:
                raise JournalMismatch(f"{self.path}: line {number} is not this evaluation's sample {row['i']}")
            self.rows[row["i"]] = row
            segments[row["segment"]] = max(segments[row["segment"]], row["t"])
        self.seconds = sum(segments.values())

    def _row(self, line: str, number: int) -> dict:
        try:
            row = json.loads(line)
            return {"i": int(row["i"]), "sample": list(row["sample"]), "score": float(row["score"]),
                    "prompt": list(row["prompt"]), "served_by": str(row["served_by"]),
                    "components": dict(row.get("components") or {}), "scorer": str(row.get("scorer", "llm")),
                    "segment": int(row["segment"]), "t": float(row["t"])}
        except (ValueError, TypeError, KeyError) as error:
            raise JournalMismatch(f"{self.path}: line {number} is not a journal row ({error})") from None

    @contextmanager
    def appender(self):
        """An append function for this run's rows (the header first when the journal is new)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            if self.path.stat().st_size == 0:
                handle.write(json.dumps(self.key, sort_keys=True) + "\n")
            segment, started = time.time_ns(), time.monotonic()

            def append(i: int, sample: Sample, score: float, prompt: list[int], served_by: str,
                       components: dict | None = None, scorer: str = "llm") -> None:
                handle.write(json.dumps({"i": i, "sample": [sample.user_id, sample.item_id, sample.ts],
                                         "score": score, "prompt": prompt, "served_by": served_by,
                                         "components": components or {}, "scorer": scorer,
                                         "segment": segment, "t": round(time.monotonic() - started, 3)}) + "\n")
                handle.flush()
            yield append


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


def agreement(samples: Sequence[Sample], served: Sequence[float], offline: Sequence[float],
              served_prompts: Sequence[Sequence[int]], offline_prompts: Sequence[Sequence[int]]) -> dict:
    delta = np.abs(np.asarray(served) - np.asarray(offline))
    prompt_mismatch = [i for i, (a, b) in enumerate(zip(served_prompts, offline_prompts)) if list(a) != list(b)]
    worst = np.argsort(-delta)[:5]
    return {"mean_abs_delta_p": float(delta.mean()), "max_abs_delta_p": float(delta.max()),
            "agree": bool(delta.mean() < AGREEMENT and not prompt_mismatch),
            "prompt_mismatches": len(prompt_mismatch),
            "worst": [{"user_id": samples[i].user_id, "item_id": samples[i].item_id, "ts": samples[i].ts,
                       "served": float(served[i]), "offline": float(offline[i])} for i in worst]}


def summarize(samples: Sequence[Sample], scores: Sequence[float]) -> dict:
    return metrics([s.label for s in samples], scores)


def paired_bootstrap(labels: Sequence[int], base: Sequence[float], other: Sequence[float], rounds: int = 1000,
                     seed: int = 0) -> dict:
    """AUC(other) - AUC(base) on the same samples, with a 95% interval from resampling the samples."""
    from sklearn.metrics import roc_auc_score

    y, a, b = np.asarray(labels), np.asarray(base), np.asarray(other)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(rounds):
        pick = rng.integers(0, len(y), len(y))
        if y[pick].min() == y[pick].max():
            continue
        deltas.append(roc_auc_score(y[pick], b[pick]) - roc_auc_score(y[pick], a[pick]))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return {"delta_auc": float(roc_auc_score(y, b) - roc_auc_score(y, a)), "ci95": [float(lo), float(hi)],
            "n": int(len(y)), "rounds": len(deltas)}


COLD_ITEM, COLD_USER = 10, 20  # fewer earlier interactions than this: a cold item / user


def component_report(samples: Sequence[Sample], served: GatewayScores, u_n: np.ndarray, i_n: np.ndarray) -> dict:
    """From one gateway pass with `explain`: each component's figures on all samples and on the cold slices,
    and the served score's gain over the CRM with its paired interval."""
    labels = np.array([s.label for s in samples])
    columns = {"served": np.asarray(served.scores),
               **{part: np.array([c.get(part, np.nan) for c in served.components]) for part in ("llm", "crm")}}
    columns = {k: v for k, v in columns.items() if not np.isnan(v).any()}
    slices = {"all": np.ones(len(samples), bool), "cold_items": i_n < COLD_ITEM, "cold_users": u_n < COLD_USER}
    out: dict = {}
    for name, mask in slices.items():
        if mask.sum() < 2 or len(set(labels[mask].tolist())) < 2:
            out[name] = {"n": int(mask.sum())}
            continue
        out[name] = {part: metrics(labels[mask].tolist(), values[mask]) for part, values in columns.items()}
        out[name]["n"] = int(mask.sum())
        if "crm" in columns:
            out[name]["served_vs_crm"] = paired_bootstrap(labels[mask], columns["crm"][mask],
                                                          columns["served"][mask])
    return out
