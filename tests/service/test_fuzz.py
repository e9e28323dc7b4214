"""Schemathesis over the gateway's own OpenAPI document: generated requests never get a 5xx.

Runs against a `lorec serve` process (real Redis, vLLM, Qdrant Edge) with a Redis key prefix of its own,
so generated events and items stay out of the other tests' data. LOREC_FUZZ_EXAMPLES sets the number of
cases per operation (CI: 25).
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from service.processes import Managed, free_port
from tests.utils.stack import AUTH, LOREC, serve_env

EXAMPLES = int(os.environ.get("LOREC_FUZZ_EXAMPLES", "25"))
SEEN: dict[str, int] = {"cases": 0, "5xx": 0}


@pytest.fixture(scope="module")
def fuzz_gateway(tiny_settings, tmp_path_factory):
    port = free_port()
    env = {**serve_env(tiny_settings, tmp_path_factory.mktemp("fuzz") / "data", port),
           "LOREC_REDIS_PREFIX": "fuzz", "LOREC_MAX_CANDIDATES": "20"}
    server = Managed("gateway", [LOREC, "serve"], tmp_path_factory.mktemp("fuzz-logs") / "gateway.log", env=env)
    base = f"http://127.0.0.1:{port}"
    server.wait_http(f"{base}/readyz", 120)
    # A few known items, so that generated scoring requests can reach the engine too.
    for item in ("1", "2", "3"):
        httpx.put(f"{base}/v1/items/{item}", json={"title": f"Fuzz film {item}"}, headers=AUTH).raise_for_status()
    yield base
    server.stop()
    print(f"\nschemathesis: {SEEN['cases']} cases, {SEEN['5xx']} server errors")


def test_generated_requests_never_get_a_server_error(fuzz_gateway):
    # Each operation's cases are drawn by hypothesis from schemathesis' strategy (its pytest plugin does
    # not support this pytest); every response below 500, every error in the one JSON error shape.
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/ctr", "/v1/rank", "/v1/events", "/v1/items/{item_id}"}
    failures: list[str] = []

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case) -> None:
            response = case.call(base_url=fuzz_gateway, headers=AUTH, timeout=60)
            SEEN["cases"] += 1
            if response.status_code >= 500:
                SEEN["5xx"] += 1
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")
            elif response.status_code >= 400:
                assert "error" in response.json(), f"{case.method} {case.formatted_path}: {response.text[:200]}"

        call()
    assert SEEN["cases"] >= EXAMPLES and not failures, failures[:5]
