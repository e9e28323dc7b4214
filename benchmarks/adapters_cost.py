"""What personal adapters cost: materialisation, a cold first request, many adapters in flight.

    .venv/bin/python benchmarks/adapters_cost.py --data ../shared/data/ml-100k [--bank NAME] [--candidates 5]

Uses the RecLoRA bank LOREC_DATA_DIR/reclora/NAME, or (no --bank) writes one with random meta-LoRAs and
gates of the trained shape (costs do not depend on the values) over the saved CRM. Starts the stack
(benchmarks/perf.py), then measures:
- materialize_s: mean time to compute a user's mixing weights and write their PEFT folder;
- cold_first_request_added_s: /v1/rank latency of a user's first personal request (materialise, load
  into vLLM, first use) minus their second (other candidates, same size), mean over users;
- throughput_ratio: /v1/rank requests/s with 8 and 64 distinct adapters in flight over 1 adapter,
  same request sizes, fresh users and candidates per case (no prefix-cache hits from an earlier
  pass), adapters loaded beforehand;
- adapter_bytes on disk and the engine's resident memory per loaded adapter.
Writes benchmarks/results/adapters.json.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import command, save  # noqa: E402
from perf import start_stack, workload  # noqa: E402

from service.auth import auth_headers  # noqa: E402
from service.config import Settings  # noqa: E402
from service.stack import Stack  # noqa: E402

HERE = Path(__file__).parent


def random_bank(settings: Settings, name: str, crm_file: str) -> None:
    from adapters.reclora import BankSettings, load_reclora

    model = load_reclora(settings.model_dir, settings=BankSettings(), user_dim=64)
    torch.manual_seed(0)
    for layer in model.layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    model.save(settings.paths.bank(name), {"base_model": str(settings.model_dir), "crm": crm_file})


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the engine core runs in a child)."""
    import subprocess

    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)], capture_output=True, text=True)
    return sum(int(x) for x in out.stdout.split())


async def timed_rank(client: httpx.AsyncClient, user: str, items: list[str], options: dict) -> float:
    started = time.perf_counter()
    r = await client.post("/v1/rank", json={"user_id": user, "item_ids": items,
                                            "options": {"retrieval": "recent", **options}})
    r.raise_for_status()
    return time.perf_counter() - started


async def throughput(url: str, requests: list[tuple[str, list[str], str]], concurrency: int) -> float:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=900, headers=auth_headers(Settings())) as client:
        async def one(user: str, items: list[str], adapter: str) -> None:
            async with limit:
                await timed_rank(client, user, items, {"adapter": adapter})

        started = time.perf_counter()
        await asyncio.gather(*(one(*r) for r in requests))
        return len(requests) / (time.perf_counter() - started)


def main(data: Path = typer.Option(Path("../shared/data/ml-100k"), exists=True, file_okay=False),
         bank: str = typer.Option(None), candidates: int = typer.Option(5), users: int = typer.Option(64),
         concurrency: int = typer.Option(16), out: Path = typer.Option(HERE / "results" / "adapters.json")) -> None:
    from service.personalize import MetaBank, Personalizer, bank_gate
    from service.records import Behaviour, Profile, UserContext

    base = Settings()
    crm_files = sorted(base.paths.crm("").glob("*-din.pt"))
    if not crm_files:
        raise typer.BadParameter("no CRM under LOREC_DATA_DIR/crm: run `lorec train crm` first")
    if bank is None:
        bank = "bench-random-bank"
        random_bank(base, bank, crm_files[0].name)
    settings = base.replace(**{"reclora_bank": bank, "adapter_mode": "personal", "engine_max_loras": 8,
                                       "engine_max_cpu_loras": users + 8, "personal_cache_size": 4 * users})
    cache = settings.paths.personal
    shutil.rmtree(cache, ignore_errors=True)

    # Materialisation, in process (what the gateway does in a worker thread).
    meta = MetaBank(settings.reclora_dir)
    personalizer = Personalizer(meta, bank_gate(settings.data_dir, meta), settings.data_dir / "bench-personal", 20,
                                1000)
    times = []
    for u in range(20):
        history = [Behaviour(str(i), i, 4.0) for i in range(1, 40 + u)]
        started = time.perf_counter()
        _, path, _ = personalizer.personal(UserContext.of(f"bench-user-{u}", Profile(), history))
        times.append(time.perf_counter() - started)
    adapter_bytes = sum(f.stat().st_size for f in path.iterdir())
    shutil.rmtree(settings.data_dir / "bench-personal", ignore_errors=True)

    os.environ.update({"LOREC_RECLORA_BANK": bank, "LOREC_ADAPTER_MODE": "personal",
                       "LOREC_ENGINE_MAX_LORAS": "8", "LOREC_ENGINE_MAX_CPU_LORAS": str(users + 8)})
    stack = Stack(settings.data_dir / "logs" / "adapters")
    try:
        url, engine = start_stack(stack, settings, data)
        work = workload(6 * users, 11)
        cold, warm = [], []

        async def cold_and_warm() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=900, headers=auth_headers(Settings())) as client:
                await timed_rank(client, work[0][0], work[0][1][:candidates], {"mode": "base"})  # warm the engine
                for i in range(8):
                    user = str(100 + i)
                    cold.append(await timed_rank(client, user, work[i][1][:candidates], {"mode": "personal"}))
                    warm.append(await timed_rank(client, user, work[i + 8][1][:candidates], {"mode": "personal"}))

        asyncio.run(cold_and_warm())
        # `users` adapters in the registry for the in-flight cases, loaded before timing.
        registry = settings.registry_dir
        names = []
        for i in range(users):
            name = f"bench-mix-{i}"
            if not (registry / name).exists():
                shutil.copytree(next(cache.glob("p-*")), registry / name)
            names.append(name)
        rss_before = rss_kib(engine.process.pid)
        def requests(case: int) -> list[tuple[str, list[str]]]:
            # Fresh users and candidates per case: vLLM's prefix cache (keyed by adapter name) would
            # otherwise serve a case the history prefixes an earlier pass computed under the same adapter.
            return [(str(300 + case * users + i), work[(2 + case) * users + i][1][:candidates]) for i in range(users)]

        asyncio.run(throughput(url, [(u, c, names[i]) for i, (u, c) in enumerate(requests(0))], concurrency))
        rss_after = rss_kib(engine.process.pid)  # every adapter loaded
        rates = {n: asyncio.run(throughput(url, [(u, c, names[i % n]) for i, (u, c) in enumerate(requests(case))],
                                           concurrency)) for case, n in enumerate((1, 8, users), start=1)}
    finally:
        stack.close()
        for path in settings.registry_dir.glob("bench-mix-*"):
            shutil.rmtree(path)
    result = {"materialize_s": round(statistics.mean(times), 4),
              "cold_first_request_added_s": round(statistics.mean(c - w for c, w in zip(cold, warm)), 3),
              "cold_first_request_s": [round(c, 3) for c in cold], "warm_request_s": [round(w, 3) for w in warm],
              "throughput_rps": {str(n): round(r, 3) for n, r in rates.items()},
              "throughput_ratio": {str(n): round(r / rates[1], 3) for n, r in rates.items() if n != 1},
              "adapter_bytes": adapter_bytes,
              "engine_rss_per_adapter_bytes": round((rss_after - rss_before) * 1024 / users),
              "candidates_per_request": candidates, "requests": users, "concurrency": concurrency, "bank": bank,
              "command": command()}
    save(out, result)


if __name__ == "__main__":
    typer.run(main)
