"""What the features stage costs a request: 20 candidates of a user with 2,000 events, on a real redis-server.

The store holds a MovieLens catalog with its item rating sets (as ingestion writes them) and one
synthetic user of 2,000 ratings written through the events path. Each round is one request's
history read and features stage as the gateway runs them (recommend.py: the item statistics script read
behind the history's read; then the genres of the history, the summary, the vectors) at an `as_of` inside
the history. `<stage>` is the stage from the history's reply to the vectors, `<stage>_with_history` the
two from the request's start; the history read alone is timed in the same run as the baseline the stage
adds to, and so are the stages of CRMs with
neighbour features (a co-rating table of the whole data set, service/corating.py): the co-rating ones, and
those with the taste ones too (the table holding the ratings: the shipped CRMs' shape). The genre cache is
warm after the first request; the first (cold) request is reported apart.

    .venv/bin/python benchmarks/features_cost.py --data ../shared/data/ml-100k -> benchmarks/results/features.json
"""

from __future__ import annotations

import asyncio
import gc
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import typer
from bench_io import command, machine, save

from service.corating import CoRating
from service.feature_vector import FeatureSpec
from service.features import FeatureReader
from service.history import HistoryStore, Keys, connect, encode_item
from service.ingest import read_movielens
from service.processes import Managed, free_port, redis_command
from service.records import Behaviour


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


async def measure(url: str, data_dir: Path, events: int, candidates: int, rounds: int) -> dict:
    data = read_movielens(data_dir)
    redis = connect(url)
    history = HistoryStore(redis, Keys("bench"), 5000)
    pipe = redis.pipeline(transaction=False)
    for item in data.items:
        pipe.hset(history.keys.item(item.item_id), mapping=encode_item(item))
    await pipe.execute()
    for start in range(0, len(data.ratings), 5000):  # every item's rating sets, in ingestion's chunks: one
        # pipeline of ML-1M's 2M writes outran redis-py's 5 s socket timeout on a slow host
        await history.add_item_ratings(data.ratings[start:start + 5000])
    rng = random.Random(0)
    start = min(b.ts for _, b in data.ratings)
    user = [Behaviour(rng.choice(data.items).item_id, start + i * 3600, float(rng.randint(1, 5)))
            for i in range(events)]
    await history.append_events([("bench-user", b, None) for b in user])
    spec = FeatureSpec.of(data.items, data.profiles.values())
    everything = max(b.ts for _, b in data.ratings) + 1  # a table of every rating of the data set
    readers = {"features": FeatureReader(history, spec),
               "features_with_neighbours": FeatureReader(history, replace(spec, corating=CoRating.fit(
                   data.ratings, everything))),
               "features_with_taste_neighbours": FeatureReader(history, replace(spec, corating=CoRating.fit(
                   data.ratings, everything, taste=True)))}
    as_of = user[-1].ts + 1
    catalog = [i.item_id for i in data.items]
    timings: dict[str, list[float]] = {"history": [], **{name: [] for name in readers},
                                       **{f"{name}_with_history": [] for name in readers}}
    cold = None
    gc.collect()  # then the setup's objects (the data set's ratings) frozen out of the collector, as the gateway
    gc.freeze()  # freezes its start (app.py): else full collections that scan them land in the timings
    collections = gc.get_stats()[2]["collections"]
    for round_ in range(rounds + 1):
        targets = rng.sample(catalog, candidates)
        started = time.perf_counter()
        context, items = await history.load_request("bench-user", targets, as_of)
        loaded = time.perf_counter()
        timings["history"].append(loaded - started)
        for name, reader in readers.items():  # as the gateway runs them: the statistics read behind the history
            began = time.perf_counter()
            async with reader.stats_read(targets, as_of, behind=True) as stats:
                context, items = await history.load_request("bench-user", targets, as_of)
                loaded = time.perf_counter()
                rows = (await reader.read(context, [items[t] for t in targets], stats)).rows
            done = time.perf_counter()
            timings[name].append(done - loaded)
            timings[f"{name}_with_history"].append(done - began)
            assert rows.shape == (candidates, len(reader.spec.names)) and len(context.behaviours) == events
        if round_ == 0:  # the genre caches fill on the first request
            cold = timings["features"][0]
            timings = {name: [] for name in timings}
    await redis.aclose()
    full_collections = gc.get_stats()[2]["collections"] - collections
    gc.unfreeze()
    figures = {name: percentiles(seconds) for name, seconds in timings.items()}
    return {**{name: figures[name] for name in readers},
            **{f"{name}_with_history": figures[f"{name}_with_history"] for name in readers},
            "features_cold_first_request_ms": round(cold * 1000, 3),
            "history_read": figures["history"], "full_collections_during_the_rounds": full_collections,
            "features_vs_history_read_p50": round(figures["features"]["p50_ms"] / figures["history"]["p50_ms"], 2)}


def main(data: Path = typer.Option(..., exists=True, file_okay=False, help="MovieLens folder (catalog, ratings)"),
         events: int = typer.Option(2000), candidates: int = typer.Option(20), rounds: int = typer.Option(1000),
         out: Path = typer.Option(Path("benchmarks/results/features.json"))) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = Managed("redis-server", redis_command(Path(tmp) / "redis", port), Path(tmp) / "redis.log")
        url = f"redis://127.0.0.1:{port}/0"
        try:
            server.wait_redis(url, 30)
            figures = asyncio.run(measure(url, data, events, candidates, rounds))
        finally:
            server.stop()
    report = {"what": f"features stage, {candidates} candidates, {events}-event user, warm genre cache",
              "target_p99_ms": 5.0, "met": figures["features"]["p99_ms"] <= 5.0,
              "met_with_neighbours": figures["features_with_neighbours"]["p99_ms"] <= 5.0,
              "met_with_taste_neighbours": figures["features_with_taste_neighbours"]["p99_ms"] <= 5.0,
              **figures, "rounds": rounds,
              "machine": machine(), "command": command()}
    save(out, report)


if __name__ == "__main__":
    typer.run(main)
