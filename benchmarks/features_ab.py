"""The features stage of two checkouts in one process: a change's effect, apart from this host's drift.

Runs of `features_cost.py` one after the other drift by up to a third on the hosts here (an unchanged history
read did), more than a change of a millisecond. This one imports another checkout's `service` package under
another name (`--before`, e.g. a `git worktree` of the commit before) beside this one, fills one redis-server as
`features_cost.py` does (the MovieLens catalog and rating sets, a synthetic user of 2,000 ratings), and times
the two features stages on the same requests, in a shuffled order each round, without and with the taste
neighbour features (the shipped CRMs' shape), and the two history reads. The rows of both are asserted equal.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/features_ab.py --before /tmp/before --data ../shared/data/ml-100k
        -> benchmarks/results/features_ab.json
"""

from __future__ import annotations

import asyncio
import importlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

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

BEFORE = "service_before"


def import_before(checkout: Path, into: Path) -> dict[str, ModuleType]:
    """The checkout's service modules the stage needs, imported as `service_before.*`."""
    package = into / BEFORE
    shutil.copytree(checkout / "service", package, ignore=shutil.ignore_patterns("__pycache__"))
    for source in package.glob("*.py"):
        source.write_text(re.sub(r"\b(from|import) service\.", rf"\1 {BEFORE}.", source.read_text()))
    sys.path.insert(0, str(into))
    return {name: importlib.import_module(f"{BEFORE}.{name}") for name in ("corating", "feature_vector", "features",
                                                                         "history")}


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


async def served(store, reader, targets: list[str], as_of: int) -> tuple[np.ndarray, float]:
    """The history read then the features stage, as the checkout's gateway runs them (recommend.py): where its
    reader has `stats_read`, the statistics are read behind the history. The rows, and when the history came."""
    if hasattr(reader, "stats_read"):
        async with reader.stats_read(targets, as_of, behind=True) as stats:
            context, items = await store.load_request("bench-user", targets, as_of)
            loaded = time.perf_counter()
            return (await reader.read(context, [items[t] for t in targets], stats)).rows, loaded
    context, items = await store.load_request("bench-user", targets, as_of)
    loaded = time.perf_counter()
    return await reader.vectors(context, [items[t] for t in targets], as_of), loaded


async def measure(url: str, data_dir: Path, before: dict[str, ModuleType], rounds: int) -> dict:
    data = read_movielens(data_dir)
    redis = connect(url)
    stores = {"after": HistoryStore(redis, Keys("bench"), 5000),
              "before": before["history"].HistoryStore(redis, before["history"].Keys("bench"), 5000)}
    pipe = redis.pipeline(transaction=False)
    for item in data.items:
        pipe.hset(stores["after"].keys.item(item.item_id), mapping=encode_item(item))
    await pipe.execute()
    for start in range(0, len(data.ratings), 5000):
        await stores["after"].add_item_ratings(data.ratings[start:start + 5000])
    rng = random.Random(0)
    first = min(b.ts for _, b in data.ratings)
    user = [Behaviour(rng.choice(data.items).item_id, first + i * 3600, float(rng.randint(1, 5)))
            for i in range(2000)]
    await stores["after"].append_events([("bench-user", b, None) for b in user])
    spec = FeatureSpec.of(data.items, data.profiles.values())
    taste = CoRating.fit(data.ratings, max(b.ts for _, b in data.ratings) + 1, taste=True)
    old_spec = before["feature_vector"].FeatureSpec(spec.genres, spec.occupations)
    old_taste = before["corating"].CoRating(taste.items, taste.users, taste.rated, taste.cutoff, stars=taste.stars)
    readers = {"after": FeatureReader(stores["after"], spec),
               "before": before["features"].FeatureReader(stores["before"], old_spec),
               "after_taste": FeatureReader(stores["after"], replace(spec, corating=taste)),
               "before_taste": before["features"].FeatureReader(stores["before"],
                                                                replace(old_spec, corating=old_taste))}
    as_of, catalog = user[-1].ts + 1, [i.item_id for i in data.items]
    timings: dict[str, list[float]] = {name: [] for name in [*readers, *(f"{r}_with_history" for r in readers),
                                                             "history_after", "history_before"]}
    for round_ in range(rounds + 5):  # the first five fill the genre caches and compile the kernels
        targets = rng.sample(catalog, 20)
        for side in rng.sample(list(stores), 2):
            began = time.perf_counter()
            await stores[side].load_request("bench-user", targets, as_of)
            timings[f"history_{side}"].append(time.perf_counter() - began)
        rows = {}
        for name, reader in rng.sample(list(readers.items()), len(readers)):
            began = time.perf_counter()
            rows[name], loaded = await served(stores[name.split("_")[0]], reader, targets, as_of)
            done = time.perf_counter()
            timings[name].append(done - loaded)
            timings[f"{name}_with_history"].append(done - began)
        for name in ("after", "after_taste"):
            assert np.array_equal(rows[name], rows[name.replace("after", "before")], equal_nan=True), name
        if round_ == 4:
            timings = {name: [] for name in timings}
    await redis.aclose()
    return {name: percentiles(seconds) for name, seconds in timings.items()}


def main(before: Path = typer.Option(..., exists=True, file_okay=False, help="a checkout of the code to compare"),
         data: Path = typer.Option(..., exists=True, file_okay=False, help="MovieLens folder (catalog, ratings)"),
         rounds: int = typer.Option(500), out: Path = typer.Option(Path("benchmarks/results/features_ab.json"))
         ) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        modules = import_before(before.resolve(), Path(tmp))
        port = free_port()
        server = Managed("redis-server", redis_command(Path(tmp) / "redis", port), Path(tmp) / "redis.log")
        url = f"redis://127.0.0.1:{port}/0"
        try:
            server.wait_redis(url, 30)
            figures = asyncio.run(measure(url, data, modules, rounds))
        finally:
            server.stop()
    ratios = {name: round(figures[name]["p50_ms"] / figures[name.replace("after", "before")]["p50_ms"], 3)
              for name in ("after", "after_taste", "history_after", "after_with_history", "after_taste_with_history")}
    commit = subprocess.run(["git", "-C", str(before), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    save(out, {"what": "features stage (20 candidates, a 2,000-event user) and history read, this code ('after') "
                       "and another checkout's ('before') in one process, same requests, shuffled order; "
                       "'<reader>': the stage from the history's reply to the rows, '<reader>_with_history': from "
                       "the request's start, the history read and the stage as the checkout's gateway runs them",
               "before_commit": commit, **figures, "p50_after_over_before": ratios, "rounds": rounds,
               "machine": machine(), "command": command().replace(str(before), f"<checkout of {commit}>")})


if __name__ == "__main__":
    typer.run(main)
