"""What the genre cache costs a request that brings new items, as it fills with a large catalog.

A catalog of `--items` synthetic items (a few genres each) is loaded through the genre cache's own loader
interface, in memory (no Redis: the cache's bookkeeping is what is timed). Each round is a request whose history
holds `--history` items already held plus `--new` items never seen; the cache takes the new ones in, and the
lookup is timed, until the catalog is held. Run it for this code and for another checkout
(`PYTHONPATH=<checkout> ... --code <commit>`) to compare.

    .venv/bin/python benchmarks/genre_cache_growth.py [--items 200000] -> benchmarks/results/genre_cache_growth.json
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import typer
from bench_io import command, machine, save

from service.feature_vector import FeatureSpec
from service.features import GenreCache
from service.history import SEP, decode_timeline
from service.records import Item

GENRES = tuple(f"genre-{n}" for n in range(18))


async def measure(items: int, history: int, new: int) -> dict:
    rng = random.Random(0)
    catalog = {f"item-{n}": Item(f"item-{n}", "t", 2000, tuple(rng.sample(GENRES, rng.randint(1, 3))))
               for n in range(items)}

    async def load(item_ids):
        return {i: catalog.get(i) for i in item_ids}

    cache = GenreCache(load, FeatureSpec(GENRES, ()), ttl_s=1e9, max_items=items + 1)
    ids, held, seconds = list(catalog), [], []
    began = time.perf_counter()
    for start in range(0, items, new):
        fresh = ids[start:start + new]
        asked = rng.sample(held, min(history, len(held))) + fresh
        asked = decode_timeline([f"{i}{SEP}4{SEP}{n}" for n, i in enumerate(asked)]).item_ids  # bytes, as read
        started = time.perf_counter()
        await cache.lookup(asked)
        seconds.append(time.perf_counter() - started)
        held.extend(fresh)
    ms = np.asarray(seconds) * 1000
    last = ms[-1000:]
    return {"requests": len(ms), "fill_s": round(time.perf_counter() - began, 2),
            "lookup_ms_first_1000_mean": round(float(ms[:1000].mean()), 3),
            "lookup_ms_last_1000_mean": round(float(last.mean()), 3),
            "lookup_ms_last_1000_p99": round(float(np.percentile(last, 99)), 3)}


def main(items: int = typer.Option(200_000), history: int = typer.Option(200), new: int = typer.Option(5),
         code: str = typer.Option("", help="which code runs (default: this checkout's commit)"),
         out: Path = typer.Option(Path("benchmarks/results/genre_cache_growth.json"))) -> None:
    figures = asyncio.run(measure(items, history, new))
    code = code or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
    save(out, {"what": f"genre cache lookups of requests each bringing {new} new items beside {history} held, "
                       f"until {items} items are held (in memory, no Redis)", "code": code, **figures,
               "machine": machine(), "command": command()})


if __name__ == "__main__":
    typer.run(main)
