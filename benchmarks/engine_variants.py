"""Engine variants side by side in one run, through the served path (issue 29):

    LOREC_DATA_DIR=var/d100k .venv/bin/python benchmarks/engine_variants.py --adapter NAME \
        [--data ../shared/data/ml-100k] [--variants "fp32 oneDNN,zentorch fp32,zentorch bf16,int8 W8A8"] \
        [--clients 4] [--requests 8] [--auc-n 2000]

On the ingested store of LOREC_DATA_DIR (its Redis at LOREC_REDIS_URL) and for each variant of
engine_settings.CONFIGS: starts the engine and a gateway serving ADAPTER, warms up, and sends the same
`/v1/rank` requests (20 candidates, K = 10, `clients` in flight) for each retrieval mode (subr, recent,
slate). Per variant: candidates/s per mode and the speedup over the first variant; the scores' agreement
with the first variant on the same prompts (mean and max |dp|); the test AUC of a seeded AUC_N-sample
slice scored through the gateway (ReLLa protocol, each sample at its as_of, the adapter alone), its
difference from the first variant's on the same samples with a 95% paired bootstrap interval, and those
samples' mean |dp|. Writes benchmarks/results/engine_variants.json.
(The engine's prefill against the matmul ceiling, on distinct prompts: engine_settings.py.)
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine, save  # noqa: E402
from engine_settings import CONFIGS  # noqa: E402
from perf import CANDIDATES, rank_requests  # noqa: E402

from adapters.figures import paired_bootstrap, summarize  # noqa: E402
from adapters.gateway_scores import score_via_gateway  # noqa: E402
from adapters.offline import Dataset  # noqa: E402
from adapters.samples import Sample, draw  # noqa: E402
from service.auth import client_key  # noqa: E402
from service.config import Settings  # noqa: E402
from service.stack import Stack  # noqa: E402

HERE = Path(__file__).parent
MODES = ("subr", "recent", "slate")


def run_variant(settings: Settings, adapter: str, requests: list, clients: int, samples: list[Sample],
                log_dir: Path) -> dict:
    """/v1/rank per retrieval mode, then the slice's scores (`slice`), through one engine and gateway."""
    with Stack(log_dir) as stack:
        stack.redis(settings.data_dir / "redis", settings.redis.url)
        engine_url, _ = stack.engine(settings)
        gateway = stack.gateway({"LOREC_ENGINE_URL": engine_url, "LOREC_DEFAULT_ADAPTER": adapter,
                                 "LOREC_ENGINE_TIMEOUT_S": "1800", "LOREC_REQUEST_DEADLINE_S": "1800"})
        asyncio.run(rank_requests(gateway, requests[:2], 1, "subr", None))  # first batches, kernels
        runs = {mode: asyncio.run(rank_requests(gateway, requests, clients, mode, None)) for mode in MODES}
        served = asyncio.run(score_via_gateway(gateway, samples, None, 10, "subr", api_key=client_key(settings),
                                               scorer="llm")) if samples else None
        return {**runs, "slice": served.scores if served else []}


def slice_figures(samples: list[Sample], scores: list[float], reference: list[float]) -> dict:
    """The slice's AUC / LogLoss / ACC, and against the reference variant's scores of the same samples."""
    deltas = np.abs(np.subtract(scores, reference))
    return {**{k: round(v, 4) for k, v in summarize(samples, scores).items()}, "n": len(samples),
            "vs_reference": paired_bootstrap([s.label for s in samples], reference, scores),
            "mean_abs_dp": round(float(deltas.mean()), 5), "max_abs_dp": round(float(deltas.max()), 5)}


def rank_workload(samples: list[Sample], n: int, seed: int) -> list[tuple[str, list[str]]]:
    """`n` requests of a test user and 20 items of the data's catalogue (ML-1M's item ids have gaps)."""
    rng = random.Random(seed)
    users, items = sorted({s.user_id for s in samples}), sorted({s.item_id for s in samples})
    return [(rng.choice(users), rng.sample(items, CANDIDATES)) for _ in range(n)]


def scores(run: dict) -> dict[tuple, float]:
    """Each candidate's score, keyed by its request (user, candidates) and item: the order of completion varies."""
    return {(tuple(r["key"]), s["item_id"]): s["score"] for r in run["records"] for s in r["items"]}


def agreement(run: dict, reference: dict) -> dict:
    mine, theirs = scores(run), scores(reference)
    deltas = np.abs([mine[k] - theirs[k] for k in theirs])
    return {"mean_abs_dp": round(float(deltas.mean()), 5), "max_abs_dp": round(float(deltas.max()), 5),
            "n": len(deltas)}


def main(adapter: str = typer.Option(..., help="the served adapter (registry of LOREC_DATA_DIR)"),
         data: Path = typer.Option(Path("../shared/data/ml-100k"), exists=True, file_okay=False,
                                   help="the MovieLens folder the store holds (the AUC slice's samples)"),
         auc_n: int = typer.Option(2000, help="test samples of the AUC slice (0: none)"),
         variants: str = typer.Option("fp32 oneDNN,zentorch fp32,zentorch bf16,int8 W8A8",
                                      help="names in engine_settings.CONFIGS; the first is the reference"),
         clients: int = typer.Option(4), requests: int = typer.Option(8), seed: int = typer.Option(0),
         out: Path = typer.Option(HERE / "results" / "engine_variants.json")) -> None:
    settings = Settings()
    torch.set_num_threads(os.cpu_count() or 1)
    names = variants.split(",")
    test = Dataset.read(data).parts["test"]
    samples = draw(test, auc_n, seed) if auc_n else []
    workload_ = rank_workload(test, requests, seed)
    runs, report = {}, {}
    for name in names:
        variant = settings.replace(**CONFIGS[name])
        runs[name] = run_variant(variant, adapter, workload_, clients, samples,
                                 settings.data_dir / "logs" / "variants")
        report[name] = {
            "candidates_per_s": {m: runs[name][m]["candidates_per_s"] for m in MODES},
            "latency_ms_p50": {m: runs[name][m]["latency_ms"]["p50"] for m in MODES}}
        typer.echo(f"{name}: {report[name]}")
    reference = names[0]
    for name in names:
        report[name]["speedup_vs_reference"] = {
            m: round(report[name]["candidates_per_s"][m] / report[reference]["candidates_per_s"][m], 3)
            for m in MODES}
        report[name]["agreement_with_reference"] = {m: agreement(runs[name][m], runs[reference][m]) for m in MODES}
        if samples:
            report[name]["auc_slice"] = slice_figures(samples, runs[name]["slice"], runs[reference]["slice"])
    save(out, {"variants": report, "reference": reference, "adapter": adapter, "clients": clients,
               "auc_slice": {"dataset": Dataset.read(data).name, "split": "test", "n": len(samples), "seed": seed},
               "requests_per_mode": requests, "candidates": CANDIDATES, "machine": machine(),
               "command": command()})


if __name__ == "__main__":
    typer.run(main)
