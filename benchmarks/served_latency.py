"""What the served default costs a request, against the LLM's own answer on the same requests.

    LOREC_DATA=../shared/data/ml-1m lorec up                  # another shell: the shipped default of that data
    .venv/bin/python benchmarks/served_latency.py --data ../shared/data/ml-1m --gateway http://127.0.0.1:8000

`/v1/rank` with 20 candidates, one client, for the users with the longest histories (the features stage
reads them all): first the deployment's default scorer (the hybrid; where its combiner kept the CRM alone it
calls no engine), then the same requests with `scorer: llm` (the engine's prefill of 20 prompts), fewer of
them (`--llm-requests 0`: none, for a gateway without an engine). Client latency p50 / p99 and the gateway's own
per-stage medians and p99 (its Server-Timing header).
Writes benchmarks/results/served_latency_<dataset>.json.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine, save  # noqa: E402

from service.auth import auth_headers  # noqa: E402
from service.config import Settings  # noqa: E402
from service.ingest import read_movielens  # noqa: E402


def stages(header: str) -> dict[str, float]:
    """Server-Timing "history;dur=4.5, features;dur=10.5" -> {stage: ms}."""
    out = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, duration = part.partition(";dur=")
        out[name] = float(duration)
    return out


def measure(client: httpx.Client, requests: list[dict], scorer: str | None) -> dict:
    latencies, per_stage, answered = [], {}, Counter()
    for body in requests:
        options = {"scorer": scorer} if scorer else {}
        started = time.perf_counter()
        response = client.post("/v1/rank", json={**body, "options": options})
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        payload = response.json()
        answered[f"{payload['scorer']}/{payload['adapter_mode']}"] += 1
        for stage, ms in stages(response.headers.get("server-timing", "")).items():
            per_stage.setdefault(stage, []).append(ms)
    ms = np.asarray(latencies) * 1000
    return {"requests": len(requests), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "answered_as": dict(answered),
            "stage_p50_ms": {s: round(float(np.median(v)), 3) for s, v in per_stage.items()},
            "stage_p99_ms": {s: round(float(np.percentile(v, 99)), 3) for s, v in per_stage.items()}}


def main(data: Path = typer.Option(..., exists=True, file_okay=False, help="the MovieLens folder the store holds"),
         gateway: str = typer.Option("http://127.0.0.1:8000"), requests: int = typer.Option(300),
         llm_requests: int = typer.Option(10), candidates: int = typer.Option(20), heavy_users: int = typer.Option(50),
         seed: int = typer.Option(0), out: Path | None = typer.Option(None)) -> None:
    movielens = read_movielens(data)
    counts = Counter(user_id for user_id, _ in movielens.ratings)
    users = [u for u, _ in counts.most_common(heavy_users)]
    catalog = [i.item_id for i in movielens.items]
    rng = random.Random(seed)
    bodies = [{"user_id": rng.choice(users), "item_ids": rng.sample(catalog, candidates), "top_k": 10}
              for _ in range(requests)]
    with httpx.Client(base_url=gateway, headers=auth_headers(Settings()), timeout=600) as client:
        scorers = client.get("/v1/adapters", headers=auth_headers(Settings(), "admin")).json().get("scorers", {})
        measure(client, bodies[:5], None)  # warm: the genre cache and the engine's adapter
        default = measure(client, bodies, None)
        llm = measure(client, bodies[:llm_requests], "llm") if llm_requests else None
    report = {"what": f"/v1/rank, {candidates} candidates, 1 client, users with the {heavy_users} longest histories "
                      f"(median {int(np.median([counts[u] for u in users]))} ratings)",
              "dataset": movielens.name, "scorers": scorers, "default": default, "llm_alone": llm,
              "llm_p50_over_default_p50": round(llm["p50_ms"] / default["p50_ms"], 1) if llm else None,
              "machine": machine(), "command": command()}
    save(out or Path(f"benchmarks/results/served_latency_{movielens.name}.json"), report)


if __name__ == "__main__":
    typer.run(main)
