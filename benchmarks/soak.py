"""Soak: sustained mixed traffic against the real stack, memory and latency sampled over time.

    .venv/bin/python benchmarks/soak.py --minutes 30 --users 2

starts redis-server (unless one answers at LOREC_REDIS_URL), the vLLM engine and the gateway of the
LOREC_* settings (an ingested store; the shipped models when it configures none), runs locust headless
(tests/load/locustfile.py: /v1/rank with 20 candidates, /v1/ctr, /v1/events) bounded by time and by
request count, and samples every `--interval` seconds the resident memory (RSS, whole process trees) of the
gateway, the engine and redis-server. Locust's 10-second-window p50/p99 give the latency series. Writes
the series and a summary to benchmarks/results/soak.json (or --out) and a plot beside it.

Target (issue 28): after the warm-up, each process's RSS grows by <= 10 % over the run, p99 does not drift
upward (last third vs first third after warm-up), no failed request.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import command, machine  # noqa: E402

from service.auth import client_key  # noqa: E402
from service.config import Settings  # noqa: E402
from service.stack import Stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "tests" / "load" / "locustfile.py"


def tree_parts_mb(pid: int) -> dict[str, float]:
    """RSS of each process of a tree by name (vLLM: the API server, EngineCore, the worker); {} once gone."""
    parts: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            name = proc.name() if proc.name().startswith("VLLM") else " ".join(proc.cmdline()[1:3])[-40:]
            parts[name] = parts.get(name, 0.0) + proc.memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        pass
    return {k: round(v, 1) for k, v in parts.items()}


def tree_rss_mb(parts: dict[str, float]) -> float:
    """Resident memory of a whole process tree (vLLM's engine core and worker are child processes)."""
    return sum(parts.values()) if parts else float("nan")


def redis_pid(stack: Stack, url: str) -> int | None:
    started = [c for c in stack.children if c.name == "redis-server"]
    if started:
        return started[0].process.pid
    port = url.rsplit(":", 1)[-1].split("/")[0]
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "redis-server" and any(f":{port}" in part for part in proc.info["cmdline"] or []):
            return proc.pid
    return None


def locust_history(prefix: Path) -> list[dict]:
    """Locust's per-interval rows of all requests together: time, p50 and p99 (ms) of the last window."""
    rows = []
    with open(f"{prefix}_stats_history.csv") as f:
        for row in csv.DictReader(f):
            # rows before the first answered request carry zeros
            if row["Name"] == "Aggregated" and row["99%"] not in ("N/A", "") and float(row["50%"]) > 0:
                rows.append({"t": float(row["Timestamp"]), "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]),
                             "rps": float(row["Requests/s"]), "requests": int(row["Total Request Count"]),
                             "failures": int(row["Total Failure Count"])})
    return rows


def locust_totals(prefix: Path) -> dict:
    with open(f"{prefix}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    return {name: {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                   "p50_ms": float(r["50%"]), "p99_ms": float(r["99%"])} for name, r in rows.items()}


def summarize(memory: list[dict], latency: list[dict], warmup_s: float, totals: dict) -> dict:
    """RSS growth per process after the warm-up, and p99 drift (median of the last third over the first)."""
    start = memory[0]["t"]
    after = [m for m in memory if m["t"] - start >= warmup_s]
    tenth = max(1, len(after) // 10)
    growth = {}
    for role in ("gateway", "engine", "redis"):
        first = statistics.median(m[role] for m in after[:tenth])
        last = statistics.median(m[role] for m in after[-tenth:])
        growth[role] = {"rss_mb_after_warmup": round(first, 1), "rss_mb_end": round(last, 1),
                        "growth": round(last / first - 1, 4), "rss_mb_peak": round(max(m[role] for m in memory), 1)}
    lat = [r for r in latency if r["t"] - start >= warmup_s]
    third = max(1, len(lat) // 3)
    p99_first = statistics.median(r["p99_ms"] for r in lat[:third]) if lat else float("nan")
    p99_last = statistics.median(r["p99_ms"] for r in lat[-third:]) if lat else float("nan")
    failures = totals["Aggregated"]["failures"]
    return {"rss": growth, "p99_ms_first_third": p99_first, "p99_ms_last_third": p99_last,
            "p99_drift": round(p99_last / p99_first - 1, 4) if lat else None, "failures": failures,
            "requests": totals["Aggregated"]["requests"],
            "met": {"rss_growth_le_10pct": all(g["growth"] <= 0.10 for g in growth.values()),
                    "p99_no_upward_drift": bool(lat) and p99_last <= 1.10 * p99_first,
                    "no_failures": failures == 0}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t0 = result["memory"][0]["t"]
    for role in ("gateway", "engine", "redis"):
        top.plot([(m["t"] - t0) / 60 for m in result["memory"]], [m[role] for m in result["memory"]], label=role)
    top.set_ylabel("RSS (MiB)")
    top.set_yscale("log")
    top.legend()
    for key in ("p50_ms", "p99_ms"):
        bottom.plot([(r["t"] - t0) / 60 for r in result["latency"]], [r[key] / 1000 for r in result["latency"]],
                    label=key.replace("_ms", ""))
    bottom.axvline(result["warmup_s"] / 60, color="grey", linestyle=":", label="end of warm-up")
    bottom.set_ylabel("latency (s), 10 s window")
    bottom.set_xlabel("minutes")
    bottom.legend()
    fig.suptitle(f"soak: {result['users']} locust users, {result['summary']['requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> dict:
    settings = Settings()
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with Stack(settings.data_dir / "logs") as stack:
        redis_url = stack.redis(settings.data_dir / "redis", settings.redis.url)
        engine_url, engine = stack.engine(settings)
        gateway_url = stack.gateway({"LOREC_ENGINE_URL": engine_url})
        gateway = next(c for c in stack.children if c.name == "gateway")
        pids = {"gateway": gateway.process.pid, "engine": engine.process.pid, "redis": redis_pid(stack, redis_url)}
        prefix = out_dir / f"{args.out.stem}-locust"
        env = {**os.environ, "LOREC_API_KEY": client_key(Settings(), "write") or "",
               "LOREC_LOAD_MAX_REQUESTS": str(args.max_requests), "LOREC_LOAD_WAIT_S": args.wait}
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users), "-r",
             str(args.users), "-t", f"{args.minutes * 60:.0f}s", "--host", gateway_url, "--csv", str(prefix),
             "--csv-full-history", "--only-summary", "--stop-timeout", "60"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(f"{prefix}.log", "w"))
        memory = []
        while locust.poll() is None:
            parts = {role: tree_parts_mb(pid) if pid else {} for role, pid in pids.items()}
            memory.append({"t": time.time(), **{role: tree_rss_mb(p) for role, p in parts.items()},
                           "engine_parts": parts["engine"]})
            time.sleep(args.interval)
    totals = locust_totals(prefix)
    latency = locust_history(prefix)
    warmup_s = args.warmup_minutes * 60
    engine_settings = {"kv_cache_gib": settings.engine.kv_cache_gib, "dtype": settings.engine.dtype,
                       "max_cpu_loras": settings.engine.max_cpu_loras}
    return {"command": command(), "machine": machine(), "minutes": args.minutes, "users": args.users,
            "wait_s": args.wait, "interval_s": args.interval, "warmup_s": warmup_s, "engine": engine_settings,
            "routes": totals, "summary": summarize(memory, latency, warmup_s, totals), "memory": memory,
            "latency": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--users", type=int, default=2, help="locust users (a rate this CPU sustains)")
    parser.add_argument("--wait", default="1,3", help="seconds between a user's requests: min,max")
    parser.add_argument("--max-requests", type=int, default=20_000, help="bound by count as well as by time")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--warmup-minutes", type=float, default=5.0, help="excluded from the growth figures")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        plot(result, args.out.with_suffix(".png"))
    except ImportError:  # matplotlib is in the bench extra
        print("no plot: pip install -e '.[bench]'", file=sys.stderr)
    print(json.dumps({"summary": result["summary"], "routes": result["routes"]}, indent=1))


if __name__ == "__main__":
    main()
