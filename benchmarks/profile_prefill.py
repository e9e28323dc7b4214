"""Where an engine prefill batch spends its time: one batch shaped like `subr`'s under the torch profiler.

    .venv/bin/python benchmarks/profile_prefill.py [--adapter PATH] [--prompts 20] [--tokens 258]

Starts the engine with the served settings (prepared model under LOREC_DATA_DIR, LOREC_ENGINE_*) and
vLLM's torch profiler, scores two warm-up batches, then profiles one batch of distinct random prompts (no
prefix-cache hits) through an adapter (a trained one by path, else a random rank-8 q/v one). The engine
worker's self CPU time is grouped by kind of op: linear layers (oneDNN), LoRA terms (the plugin's plain
matmuls), attention, norms, activations, the output layer (the vocabulary projection, told apart by its
shape), sampling and logprobs, torch.compile work, framework code between ops, other; the rest of the
request's wall time is outside the worker's ops (front end, scheduling, inter-process hops, the profiler's
own cost). Writes benchmarks/results/profile_prefill.json
and prints the table.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine, save  # noqa: E402
from lora_prefill import make_adapters, random_prompts  # noqa: E402

from service.config import Settings  # noqa: E402
from service.stack import Stack  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "profile_prefill.json"
LINEAR = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "onednn_mm", "scaled_mm",
          "gemm", "zentorch")
# A nested op counts toward its outermost categorised ancestor (an attention kernel's inner matmuls are attention).
INHERITED = {"lora", "attention", "output layer", "norm", "activation", "sampling", "compile"}
KINDS = ("linear", "lora", "attention", "output layer", "norm", "activation", "sampling", "compile", "framework",
         "other")


def kind_of(event: dict, vocab: int) -> str:
    name = event["name"].lower()
    if any(k in name for k in ("compile", "dynamo", "inductor", "aotautograd", "pycodecache")):
        return "compile"
    if event.get("cat") == "user_annotation":
        return "framework"
    if any(k in name for k in ("lora", "punica", "sgmv", "bgmv")):
        return "lora"
    dims = json.dumps(event.get("args", {}).get("Input Dims", []))
    if any(k in name for k in LINEAR):
        if str(vocab) in dims:
            return "output layer"
        # vLLM's CPU path sends every dense layer to oneDNN (`_C::onednn_mm`); the plain matmuls left are
        # the LoRA terms of the lorec_cpu_lora plugin (Python functions, so no op of their own).
        return "linear" if "onednn" in name or "scaled_mm" in name or "zentorch" in name else "lora"
    if any(k in name for k in ("attn", "attention", "sdpa", "paged", "flash", "kv_cache")):
        return "attention"
    if "norm" in name or name in ("aten::pow", "aten::mean", "aten::rsqrt"):
        return "norm"
    if any(k in name for k in ("gelu", "silu", "act_and_mul", "tanh")):
        return "activation"
    if any(k in name for k in ("softmax", "sort", "topk", "sample", "argmax", "logprob")):
        return "sampling"
    return "other"


def self_time_by_kind(events: list[dict], vocab: int) -> dict[str, float]:
    """Seconds of self time per kind: each op's duration less its children's, on its own thread."""
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    totals: dict[str, float] = defaultdict(float)
    for thread in by_thread.values():
        add_thread(sorted(thread, key=lambda e: (e["ts"], -e["dur"])), vocab, totals)
    return {k: v / 1e6 for k, v in totals.items()}


def add_thread(spans: list[dict], vocab: int, totals: dict[str, float]) -> None:
    """Adds one thread's self times (microseconds) per kind; `spans` sorted by start, outer first."""
    stack: list[list] = []  # open ops: [end, kind, duration, children's time]
    for e in [*spans, {"ts": float("inf")}]:
        while stack and stack[-1][0] <= e["ts"]:
            _, kind, duration, children = stack.pop()
            totals[kind] += max(0.0, duration - children)
        if "dur" not in e:
            break
        parent = stack[-1][1] if stack else None
        kind = parent if parent in INHERITED else kind_of(e, vocab)
        if stack:
            stack[-1][3] += e["dur"]
        stack.append([e["ts"] + e["dur"], kind, e["dur"], 0.0])


def completion(model: str, prompts: list[list[int]]) -> dict:
    """The request the gateway sends: one token, greedy, with logprobs (whose first use compiles: 2.5 s)."""
    return {"model": model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0, "logprobs": 2}


def warm_up(url: str, adapter: Path, prompts: int, tokens: int) -> None:
    """Loads the adapter as `served` and sends two batches like the profiled one: kernels, compiles, the
    adapter's first use."""
    with httpx.Client(base_url=url, timeout=900) as client:
        client.post("/v1/load_lora_adapter", json={"lora_name": "served", "lora_path": str(adapter)}
                    ).raise_for_status()
        for seed in (1, 2):
            client.post("/v1/completions", json=completion("served", random_prompts(prompts, tokens, seed))
                        ).raise_for_status()


def profile(url: str, model: str, prompts: list[list[int]], trace_dir: Path) -> tuple[float, list[dict]]:
    """Wall seconds of one profiled batch, and the worker's trace events."""
    with httpx.Client(base_url=url, timeout=900) as client:
        client.post("/start_profile").raise_for_status()
        started = time.perf_counter()
        client.post("/v1/completions", json=completion(model, prompts)).raise_for_status()
        wall = time.perf_counter() - started
        client.post("/stop_profile").raise_for_status()
    for _ in range(120):  # the worker writes its trace after the stop call returns
        traces = sorted(trace_dir.rglob("*.pt.trace.json*"))
        if traces:
            time.sleep(2)
            break
        time.sleep(1)
    events: list[dict] = []
    for path in traces:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events += json.load(f)["traceEvents"]
    return wall, events


def main(adapter: Path = typer.Option(None, help="a trained adapter folder (default: a random rank-8 q/v one)"),
         prompts: int = typer.Option(20, help="prompts in the batch"), tokens: int = typer.Option(258),
         out: Path = typer.Option(RESULTS)) -> None:
    settings = Settings()
    config = json.loads((settings.model_dir / "config.json").read_text())
    vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = Path(tmp) / "trace"
        profiler = {"profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": False,
                    "torch_profiler_record_shapes": True, "ignore_frontend": True}
        engine = settings.replace(**{"engine_extra_args": f"--profiler-config '{json.dumps(profiler)}'"})
        path = adapter or make_adapters(settings.model_dir, Path(tmp), 1)[0]
        with Stack(settings.data_dir / "logs") as stack:
            url, _ = stack.engine(engine, name="vllm-profile")
            warm_up(url, path, prompts, tokens)
            wall, events = profile(url, "served", random_prompts(prompts, tokens, 3), trace_dir)
    seconds = self_time_by_kind(events, vocab)
    in_ops = sum(seconds.values())
    rows = {k: {"seconds": round(seconds.get(k, 0.0), 3), "share": round(seconds.get(k, 0.0) / wall, 3)}
            for k in KINDS}
    rows["outside the worker's ops"] = {"seconds": round(wall - in_ops, 3), "share": round(1 - in_ops / wall, 3)}
    report = {"wall_s": round(wall, 3), "prompt_tokens": prompts * (tokens + 1),
              "tokens_per_s_profiled": round(prompts * (tokens + 1) / wall, 1), "by_kind": rows,
              "top_ops": top_ops(events), "adapter": str(adapter) if adapter else "random rank-8 q/v",
              "dtype": settings.engine.dtype, "model": settings.model_dir.name, "machine": machine(),
              "command": command()}
    save(out, report, shown={"wall_s": report["wall_s"], "by_kind": rows})


def top_ops(events: list[dict], n: int = 25) -> list[dict]:
    """The ops with the most total time (inclusive), for reading the table's kinds against."""
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            total[e["name"]] += e["dur"] / 1e6
            calls[e["name"]] += 1
    ranked = sorted(total, key=total.get, reverse=True)[:n]
    return [{"op": name, "seconds_inclusive": round(total[name], 3), "calls": calls[name]} for name in ranked]


if __name__ == "__main__":
    typer.run(main)
