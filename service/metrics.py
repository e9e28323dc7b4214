"""Prometheus metrics, one registry per app (no global state at import)."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram("lorec_request_seconds", "Request latency by route",
                                         ["route", "method", "status"], buckets=_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("lorec_stage_seconds", "Latency of one stage of the request flow",
                                       ["stage"], buckets=_BUCKETS, registry=self.registry)
        self.engine_calls = Counter("lorec_engine_calls_total", "Scoring calls to the vLLM engine",
                                    ["adapter", "outcome"], registry=self.registry)
        self.engine_prompts = Counter("lorec_engine_prompts_total", "Prompts scored by the engine",
                                      registry=self.registry)
        self.degraded = Counter("lorec_degraded_total",
                                "Answers in which a stand-in replaced a failed part (retrieval, llm)",
                                ["part"], registry=self.registry)
        self.adapter_loads = Counter("lorec_adapter_loads_total", "Adapter loads into the engine",
                                     ["outcome"], registry=self.registry)
        self.answers = Counter("lorec_answers_total", "Scored answers by the scorer and adapter mode that served them",
                               ["scorer", "adapter_mode"], registry=self.registry)
        self.fallbacks = Counter("lorec_fallbacks_total",
                                 "Steps of the fallback chain skipped on the way to an answer (adapter mode or scorer)",
                                 ["step"], registry=self.registry)
        self.dependency_errors = Counter("lorec_dependency_errors_total",
                                         "Requests failed by a dependency (redis, qdrant, vllm)", ["dependency"],
                                         registry=self.registry)
        self.quarantined = Gauge("lorec_adapters_quarantined", "Adapters the engine refused, not retried",
                                 registry=self.registry)
        self.warm = Gauge("lorec_warm", "1 once the engine has scored the warm-up requests (the gateway is ready)",
                          registry=self.registry)

    @contextmanager
    def stage(self, name: str, timings: dict[str, float] | None = None):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.stage_seconds.labels(name).observe(elapsed)
            if timings is not None:
                timings[name] = timings.get(name, 0.0) + elapsed
