"""One way to start the stack: redis-server, the vLLM engine and the gateway as child processes.

`lorec up`, the test fixtures, the benchmarks and the quality runs start processes through a `Stack`:
each child gets a free port (unless given one), is waited for until it answers, and is stopped, with
the others, when the stack closes (SIGTERM, then SIGKILL; children run in their own process group).
How each process is started (its command line and environment) is service/processes.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

import redis as redis_client

from service.config import Settings
from service.model import engine_weights
from service.processes import Managed, engine_command, engine_env, free_port, redis_command

LOREC = str(Path(sys.executable).with_name("lorec"))
ENGINE_START_TIMEOUT_S = 900  # a fresh vLLM on 2 CPU cores takes 1-3 minutes, more beside other work
GATEWAY_START_TIMEOUT_S = 120


def redis_answers(url: str) -> bool:
    try:
        return bool(redis_client.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis_client.RedisError:
        return False


class Stack:
    """Children started in order and stopped in reverse; use as a context manager."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[Managed] = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def _start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Managed:
        child = Managed(name, command, self.logs / f"{name}.log", env=env)
        self.children.append(child)
        return child

    def redis(self, data_dir: Path, url: str | None = None) -> str:
        """redis-server with AOF under `data_dir` at `url` (a free port when None), unless one answers there."""
        url = url or f"redis://127.0.0.1:{free_port()}/0"
        if not redis_answers(url):
            self._start("redis-server", redis_command(data_dir, urlparse(url).port or 6379)).wait_redis(url, 30)
        return url

    def engine(self, settings: Settings, model_dir: Path | None = None, port: int | None = None,
               wait: bool = True, name: str = "vllm") -> tuple[str, Managed]:
        """The vLLM server of `settings` (its model unless `model_dir`) on `port` (free when None); with
        `wait=False` it is started but not yet waited for (`wait_engine`)."""
        port = port or free_port()
        weights = engine_weights(settings.engine, model_dir or settings.model_dir)
        child = self._start(name, engine_command(settings.engine, weights, port),
                            engine_env(settings.engine, weights))
        url = f"http://127.0.0.1:{port}"
        if wait:
            self.wait_engine(url, child)
        return url, child

    @staticmethod
    def wait_engine(url: str, child: Managed) -> None:
        child.wait_http(f"{url}/health", ENGINE_START_TIMEOUT_S)

    def gateway(self, env: dict[str, str], port: int | None = None, name: str = "gateway") -> str:
        """`lorec serve` configured by `env` (over this process's environment) on `port`, once /readyz answers."""
        port = port or free_port()
        child = self._start(name, [LOREC, "serve"], {**os.environ, **env, "LOREC_PORT": str(port)})
        url = f"http://127.0.0.1:{port}"
        child.wait_http(f"{url}/readyz", GATEWAY_START_TIMEOUT_S)
        return url

    def stop(self, name: str) -> None:
        """Stop the children called `name` (e.g. to restart the gateway with other settings)."""
        for child in [c for c in self.children if c.name == name]:
            child.stop()
            self.children.remove(child)
