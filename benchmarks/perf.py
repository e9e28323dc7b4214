"""`/v1/rank` speed against a ReLLa-style baseline, measured side by side in one run.

    .venv/bin/python benchmarks/perf.py --data ../shared/data/ml-100k [--levels 1,4,16] [--adapter NAME]

Starts redis-server, the vLLM engine and the gateway on LOREC_DATA_DIR (default var/, ingesting the
MovieLens folder when needed), warms up, then for each retrieval mode (`subr`, `recent`) sends
`/v1/rank` requests with 20 candidates and K = 10 at 1, 4 and 16 concurrent clients: latency
p50/p95/p99, candidates scored per second, and the per-stage breakdown the gateway reports in its
Server-Timing header. The gateway's own share is measured on a user with a 2,000-event history.
Baseline: the same prompts scored the way ReLLa scores, HF transformers (+ PEFT for an adapter),
batched forward passes, same model and thread count; the scores must agree (mean |delta p|).
Physical limit: the engine's prefill tokens/s next to a plain matmul of the model's shapes in the engine's dtype.
Writes benchmarks/results/perf.json, perf.md and perf_latency.png (next to it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine, save  # noqa: E402

from service.auth import auth_headers  # noqa: E402
from service.config import Settings  # noqa: E402
from service.processes import Managed  # noqa: E402
from service.stack import LOREC, Stack  # noqa: E402

HERE = Path(__file__).parent
CANDIDATES, K = 20, 10


def start_stack(stack: Stack, settings: Settings, data: Path) -> tuple[str, Managed]:
    """redis-server, vLLM and `lorec serve` as a user runs them, the data ingested; the gateway URL and the
    engine process."""
    redis_url = stack.redis(settings.data_dir / "redis")
    engine_url, engine = stack.engine(settings, wait=False)
    env = {"LOREC_REDIS_URL": redis_url, "LOREC_ENGINE_URL": engine_url, "LOREC_DATA_DIR": str(settings.data_dir),
           # 16 clients queue ~30 requests of ~10 s each on 2 cores: measure the queue, do not time it out.
           "LOREC_ENGINE_TIMEOUT_S": "1800", "LOREC_REQUEST_DEADLINE_S": "1800",
           # the LLM's own score, which the baseline computes (a data folder of `lorec up` serves the hybrid)
           "LOREC_SCORER": "llm"}
    ingest = subprocess.run([LOREC, "ingest", "movielens", "--dir", str(data)], env={**os.environ, **env},
                            capture_output=True, text=True)
    if ingest.returncode != 0:
        raise RuntimeError("ingestion failed:\n" + ingest.stderr[-3000:])
    stack.wait_engine(engine_url, engine)
    return stack.gateway(env), engine


def workload(n: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    return [(str(rng.randint(1, 943)), [str(i) for i in rng.sample(range(1, 1683), CANDIDATES)]) for _ in range(n)]


async def rank_requests(url: str, requests: list[tuple[str, list[str]]], concurrency: int, mode: str,
                        adapter: str | None) -> dict:
    """Latencies, Server-Timing stages and bodies of `requests`, `concurrency` in flight."""
    limit = asyncio.Semaphore(concurrency)
    options = {"retrieval": mode, "k": K, "return_prompt": True, **({"adapter": adapter} if adapter else {})}
    records: list[dict] = []

    async def one(client: httpx.AsyncClient, user: str, items: list[str]) -> None:
        async with limit:
            started = time.perf_counter()
            r = await client.post("/v1/rank", json={"user_id": user, "item_ids": items, "options": options})
            wall = time.perf_counter() - started
        r.raise_for_status()
        stages = {k: float(v) / 1000 for k, v in (p.split(";dur=") for p in r.headers["server-timing"].split(", "))}
        records.append({"key": [user, *items], "wall": wall, "stages": stages, "items": r.json()["items"]})

    async with httpx.AsyncClient(base_url=url, timeout=600, headers=auth_headers(Settings())) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, u, i) for u, i in requests))
        elapsed = time.perf_counter() - started
    walls = np.array([r["wall"] for r in records]) * 1000
    return {"latency_ms": {q: round(float(np.percentile(walls, p)), 1) for q, p in (("p50", 50), ("p95", 95),
                                                                                     ("p99", 99))},
            "candidates_per_s": round(len(records) * CANDIDATES / elapsed, 2), "requests": len(records),
            "stages_ms": {s: round(1000 * float(np.mean([r["stages"].get(s, 0) for r in records])), 2)
                          for s in records[0]["stages"]},
            "records": records}


def overhead_fraction(records: list[dict]) -> float:
    """p99 over requests of (client wall time - engine stage) / wall time."""
    return float(np.percentile([(r["wall"] - r["stages"]["engine"]) / r["wall"] for r in records], 99))


def long_history_events(user: str, n: int, now: int) -> list[dict]:
    """`n` rated events of a fresh user, one a second up to `now`: after every rating of a data set recorded
    before the run, so no point-in-time read of it (an evaluation's `as_of`, a trainer's sample) sees them.
    They used to be dated 1995, before MovieLens' ratings: each run then added 2,000 ratings to the past of
    the store it ran on, and the items' statistics that every later evaluation read were no longer the data's
    (the shipped ML-100K CRM's validation AUC 0.7729 -> 0.7725 after one run, 0.7718 after three)."""
    rng = random.Random(7)
    return [{"user_id": user, "item_id": str(rng.randint(1, 1682)), "ts": now - n + i, "rating": rng.randint(1, 5)}
            for i in range(n)]


async def long_history_user(url: str, n: int = 2000) -> str:
    now = int(time.time())
    user = f"perf-{n}-events-{now}"  # a fresh user per run: no events left from earlier runs
    events = long_history_events(user, n, now)
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth_headers(Settings(), "write")) as client:
        for start in range(0, n, 1000):
            (await client.post("/v1/events", json={"events": events[start:start + 1000]})).raise_for_status()
    return user


def baseline(settings: Settings, records: list[dict], adapter: str | None) -> dict:
    """ReLLa's way: transformers (+ PEFT) batched forward passes over the same prompts, in the engine's dtype."""
    from adapters.train import load_model, score
    from service.prompt import load_codec
    from service.routing import AdapterRegistry

    codec = load_codec(settings.model_dir)
    adapter_dir = AdapterRegistry(settings.registry_dir).path(adapter) if adapter else None
    model = load_model(settings.model_dir, adapter_dir=adapter_dir, dtype=getattr(torch, settings.engine.dtype))
    prompts = [s["prompt_token_ids"] for r in records for s in r["items"]]
    served = [s["score"] for r in records for s in r["items"]]
    score(model, prompts[:8], codec.answer, codec.pad_id)  # warm-up
    started = time.perf_counter()
    scores = score(model, prompts, codec.answer, codec.pad_id, batch_size=CANDIDATES)
    elapsed = time.perf_counter() - started
    tokens = sum(len(p) for p in prompts)
    return {"candidates_per_s": round(len(prompts) / elapsed, 2), "prompt_tokens_per_s": round(tokens / elapsed, 1),
            "score_mean_abs_diff": round(float(np.mean(np.abs(np.array(scores) - np.array(served)))), 7),
            "prompt_tokens": tokens}


def mode_summary(settings: Settings, by_level: dict, levels: list[int], adapter: str | None) -> dict:
    """Best candidates/s of one retrieval mode against the baseline on that mode's own prompts."""
    best_level = max(by_level, key=lambda c: by_level[c]["candidates_per_s"])
    base = baseline(settings, by_level[f"c{levels[0]}"]["records"], adapter)
    best = by_level[best_level]["candidates_per_s"]
    return {"candidates_per_s": best, "best_level": best_level, "baseline": base,
            "ratio": round(best / base["candidates_per_s"], 3)}


def model_config(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("text_config", config)


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(in, out) of one decoder layer's linear layers as vLLM merges them."""
    config = model_config(model_dir)
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim", h // config["num_attention_heads"])
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * inter), "down_proj": (inter, h)}


def matmul_ceiling(model_dir: Path, dtype: torch.dtype, tokens: int = 2048) -> dict:
    """Tokens/s a plain matmul chain of one token's linear layers would reach on this CPU, through the fastest
    of torch's matmul and vLLM's own oneDNN GEMM for floats (the engine calls the latter; torch's reached half
    of it in fp32 on an AMD Zen 5), torch's int8 x int8 -> int32 matmul for int8 (gflops: GOP/s for int8)."""
    shapes, layers = list(linear_shapes(model_dir).values()), model_config(model_dir)["num_hidden_layers"]
    if dtype == torch.int8:
        x = {k: torch.randint(-127, 127, (tokens, k), dtype=dtype) for k, _ in shapes}
        w = [torch.randint(-127, 127, (k, n), dtype=dtype) for k, n in shapes]
        kernels = {"torch._int_mm": [lambda a, wi=wi: torch._int_mm(a, wi) for wi in w]}
    else:
        from vllm import _custom_ops as ops

        x = {k: torch.randn(tokens, k, dtype=dtype) for k, _ in shapes}
        w = [torch.randn(k, n, dtype=dtype) for k, n in shapes]
        handlers = [ops.create_onednn_mm(wi, 32) for wi in w]
        kernels = {"torch.matmul": [lambda a, wi=wi: a @ wi for wi in w],
                   "vllm onednn_mm": [lambda a, hi=hi: ops.onednn_mm(hi, a, None) for hi in handlers]}
    flops_per_token = 2 * sum(k * n for k, n in shapes) * layers
    by_kernel = {}
    for name, calls in kernels.items():
        for _ in range(2):
            [call(x[k]) for (k, _), call in zip(shapes, calls)]
        started = time.perf_counter()
        for _ in range(3):
            [call(x[k]) for (k, _), call in zip(shapes, calls)]
        by_kernel[name] = tokens / ((time.perf_counter() - started) / 3 * layers)
    best = max(by_kernel, key=by_kernel.get)
    return {"tokens_per_s": round(by_kernel[best], 1), "gflops": round(flops_per_token * by_kernel[best] / 1e9, 1),
            "kernel": best, "by_kernel_tokens_per_s": {k: round(v, 1) for k, v in by_kernel.items()}}


def write_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, by_level in report["modes"].items():
        for q in ("p50", "p99"):
            ax.plot(levels, [by_level[f"c{c}"]["latency_ms"][q] / 1000 for c in levels], marker="o",
                    label=f"{mode} {q}")
    ax.set(xlabel="concurrent clients", ylabel="latency (s)", xscale="log", title="/v1/rank, 20 candidates, K=10")
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_name("perf_latency.png"), dpi=120)
    lines = ["# /v1/rank performance", "", f"Machine: {report['machine']}. Command: `{report['command']}`.", "",
             "| mode | clients | p50 ms | p95 ms | p99 ms | candidates/s | " +
             " | ".join(f"{s} ms" for s in report["stages"]) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(report["stages"])]
    for mode, by_level in report["modes"].items():
        for c in levels:
            r = by_level[f"c{c}"]
            lines.append(f"| {mode} | {c} | " + " | ".join(str(r["latency_ms"][q]) for q in ("p50", "p95", "p99")) +
                         f" | {r['candidates_per_s']} | " +
                         " | ".join(str(r["stages_ms"].get(s, 0)) for s in report["stages"]) + " |")
    lines += ["", "| retrieval | gateway candidates/s (best level) | baseline candidates/s (transformers "
              "batched, same prompts) | ratio | mean abs delta p |", "|---|---|---|---|---|"]
    for mode, m in report["per_mode"].items():
        lines.append(f"| {mode} | {m['candidates_per_s']} ({m['best_level']}) | {m['baseline']['candidates_per_s']}"
                     f" | {m['ratio']} | {m['baseline']['score_mean_abs_diff']} |")
    b = report["per_mode"]["subr"]["baseline"]
    lines += ["", "| figure | value |", "|---|---|",
              f"| gateway overhead, p99 fraction of request time (2,000-event history) | "
              f"{report['gateway_overhead_p99_frac']} |",
              f"| LoRA prefill / base (from lora_prefill.json) | {report['lora_prefill_ratio']} |",
              f"| engine prompt tokens/s, subr at its best level (prefix-cache hits count as tokens) | "
              f"{report['engine_prefill_tokens_per_s']} |",
              f"| {report['dtype']} matmul ceiling tokens/s ({report['matmul_ceiling']['gflops']} GFLOP/s) | "
              f"{report['matmul_ceiling']['tokens_per_s']} |",
              f"| engine / ceiling | {report['engine_vs_ceiling']} |",
              f"| baseline prompt tokens/s | {b['prompt_tokens_per_s']} |", "", "![latency](perf_latency.png)", ""]
    out.with_name("perf.md").write_text("\n".join(lines))


def main(data: Path = typer.Option(Path("../shared/data/ml-100k"), exists=True, file_okay=False),
         levels: str = typer.Option("1,4,16"), per_level: int = typer.Option(2, help="requests per client"),
         modes: str = typer.Option("subr,recent,slate"), adapter: str = typer.Option(None),
         seed: int = typer.Option(0), out: Path = typer.Option(HERE / "results" / "perf.json")) -> None:
    settings = Settings()
    torch.set_num_threads(os.cpu_count() or 1)
    with Stack(settings.data_dir / "logs" / "perf") as stack:
        url, _ = start_stack(stack, settings, data)
        asyncio.run(rank_requests(url, workload(2, seed + 99), 1, "subr", adapter))  # warm-up
        level_list = [int(c) for c in levels.split(",")]
        report: dict = {"levels": level_list, "modes": {}}
        for mode in modes.split(","):
            report["modes"][mode] = {}
            for c in level_list:
                run = asyncio.run(rank_requests(url, workload(max(c * per_level, 4), seed + c), c, mode, adapter))
                report["modes"][mode][f"c{c}"] = run
                typer.echo(f"{mode} c{c}: {run['latency_ms']} {run['candidates_per_s']} cand/s {run['stages_ms']}")
        user = asyncio.run(long_history_user(url))
        long = asyncio.run(rank_requests(url, [(user, items) for _, items in workload(8, seed + 5)], 1, "subr",
                                         adapter))
    per_mode = {mode: mode_summary(settings, by_level, level_list, adapter)
                for mode, by_level in report["modes"].items()}
    headline = per_mode["subr"]  # ReLLa's retrieval, the deployment default
    best = max(report["modes"]["subr"].values(), key=lambda r: r["candidates_per_s"])
    engine_tokens = sum(len(s["prompt_token_ids"]) for r in best["records"] for s in r["items"])
    engine_tps = engine_tokens / (best["requests"] * CANDIDATES / best["candidates_per_s"])
    ceiling = matmul_ceiling(settings.model_dir, getattr(torch, settings.engine.dtype))
    lora = HERE / "results" / "lora_prefill.json"
    report.update({
        "rank_candidates_per_s": headline["candidates_per_s"],
        "baseline_candidates_per_s": headline["baseline"]["candidates_per_s"], "ratio": headline["ratio"],
        "score_mean_abs_diff": headline["baseline"]["score_mean_abs_diff"], "per_mode": per_mode,
        "gateway_overhead_p99_frac": round(overhead_fraction(long["records"]), 4),
        "long_history_latency_ms": long["latency_ms"], "long_history_stages_ms": long["stages_ms"],
        "lora_prefill_ratio": json.loads(lora.read_text())["plugin"]["ratio_to_base"] if lora.exists() else None,
        "latency_ms": {f"c{c}": report["modes"]["subr"][f"c{c}"]["latency_ms"] for c in level_list},
        "engine_prefill_tokens_per_s": round(engine_tps, 1), "matmul_ceiling": ceiling,
        "engine_vs_ceiling": round(engine_tps / ceiling["tokens_per_s"], 3),
        "stages": list(best["stages_ms"]), "adapter": adapter, "dtype": settings.engine.dtype,
        "machine": machine(),
        "command": command()})
    long.pop("records")
    for by_level in report["modes"].values():
        for r in by_level.values():
            r.pop("records")
    save(out, report, shown={k: v for k, v in report.items() if k != "modes"})
    write_report(report, out)


if __name__ == "__main__":
    typer.run(main)
