"""The engine client (service/scoring.py): the score formula, the reply's parsing, and a real vLLM server
stopped (SIGSTOP), killed (SIGKILL) or erroring under the gateway: the CRM answers, flagged, within the deadline."""

from __future__ import annotations

import math
import os
import signal
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.prompt import AnswerTokens
from service.scoring import EngineError, p_yes, parse_answer_logprobs
from tests.utils.http import ctr
from tests.utils.metrics import metric_total
from tests.utils.stack import AUTH, make_settings, start_engine

ITEMS = ["1", "50", "100", "181"]


def test_p_yes_is_the_two_way_softmax_and_stable():
    for yes, no in ((-0.1, -2.5), (-3.0, -0.2), (-1.0, -1.0), (-800.0, -0.1), (-0.1, -800.0)):
        expected = math.exp(yes) / (math.exp(yes) + math.exp(no)) if max(-yes, -no) < 700 else None
        got = p_yes(yes, no)
        assert 0.0 <= got <= 1.0
        if expected is not None:
            assert got == pytest.approx(expected, rel=1e-12)
    assert p_yes(-800.0, -0.1) < 1e-300 and p_yes(-0.1, -800.0) == 1.0


def test_parse_answer_logprobs_reads_by_token_id_and_index():
    body = {"choices": [
        {"index": 1, "logprobs": {"top_logprobs": [{"token_id:5": -0.5, "token_id:7": -1.5, "token_id:9": -0.1}]}},
        {"index": 0, "logprobs": {"top_logprobs": [{"token_id:5": -2.0, "token_id:7": -0.2}]}},
    ]}
    got = parse_answer_logprobs(body, AnswerTokens(yes=5, no=7), 2)
    assert [(a.yes, a.no) for a in got] == [(-2.0, -0.2), (-0.5, -1.5)]
    with pytest.raises(EngineError):
        parse_answer_logprobs({"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:5": -1}]}}]},
                              AnswerTokens(yes=5, no=7), 1)


# --- a real engine that stops, dies or errors under the gateway (README, "Faults") ---------------


def degraded_llm_count(client) -> float:
    return metric_total(client.get("/metrics").text, "lorec_degraded_total", part="llm")


def crm_expected(client) -> list[float]:
    """The CRM's own answer to the same request (scorer crm: no engine involved)."""
    body = ctr(client, "1", ITEMS, retrieval="recent", scorer="crm").json()
    assert body["scorer"] == "crm" and body["adapter_mode"] == "crm"
    return [s["score"] for s in body["scores"]]


@pytest.fixture(scope="module")
def spare_engine(workdir, tiny_model, redis_url):
    """A second tiny vLLM server that this module may stop and kill."""
    engine, url = start_engine(make_settings(workdir, tiny_model, redis_url), tiny_model,
                               workdir / "logs" / "vllm-spare.log")
    # A fresh engine's first batch is slow (warm-up); the tests' short deadlines are for later calls.
    httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": [[1, 2, 3]], "max_tokens": 1},
               timeout=300).raise_for_status()
    yield engine, url
    engine.stop()


def test_engine_stopped_then_killed_falls_back_to_the_crm_within_the_deadline(crm_fallback_settings,
                                                                              spare_engine):
    engine, url = spare_engine
    # Two gateways at once: qdrant-client's local mode, since one Qdrant Edge shard opens in one place only.
    # The deadline leaves room for two engines sharing two cores (a healthy call takes ~1-4 s here).
    deadline = 10.0
    with_crm = crm_fallback_settings.replace(**{"engine_url": url, "request_deadline_s": deadline,
                                                "qdrant_url": ":memory:"})
    no_crm = with_crm.replace(**{"crm": None})
    with TestClient(create_app(with_crm), headers=AUTH) as client, \
            TestClient(create_app(no_crm), headers=AUTH) as bare:
        # The first gateway-shaped prompt can still miss the deadline on a loaded machine: a few tries
        # to see the engine healthy before stopping it.
        for _ in range(3):
            started = time.monotonic()
            healthy = ctr(client, "1", ITEMS, retrieval="recent")
            print(f"\nhealthy call on the spare engine: {time.monotonic() - started:.2f}s")
            if "degraded" not in healthy.json():
                break
        assert healthy.status_code == 200 and "degraded" not in healthy.json()
        expected = crm_expected(client)
        degraded_before = degraded_llm_count(client)

        os.killpg(engine.process.pid, signal.SIGSTOP)  # slow: the engine takes the request and never answers
        try:
            started = time.monotonic()
            slow = ctr(client, "1", ITEMS, retrieval="recent")
            elapsed = time.monotonic() - started
            started = time.monotonic()
            timed_out = ctr(bare, "1", ITEMS, retrieval="recent")
            elapsed_bare = time.monotonic() - started
        finally:
            os.killpg(engine.process.pid, signal.SIGCONT)
        assert slow.status_code == 200, slow.text
        assert slow.json()["degraded"] == ["llm"] and slow.json()["adapter_mode"] == "crm"
        assert slow.json()["scorer"] == "crm" and "logprob_yes" not in slow.json()["scores"][0]
        assert max(elapsed, elapsed_bare) < deadline + 2.0, f"answered after {elapsed:.1f}s, deadline {deadline}s"
        assert [s["score"] for s in slow.json()["scores"]] == pytest.approx(expected, abs=1e-6)
        assert timed_out.status_code == 504 and timed_out.json()["error"]["dependency"] == "vllm"
        back = ctr(client, "1", ITEMS, retrieval="recent")
        assert back.json().get("degraded") is None, "back to the LLM once it answers"

        os.killpg(engine.process.pid, signal.SIGKILL)
        engine.process.wait(30)
        dead = ctr(client, "1", ITEMS, retrieval="recent")
        assert dead.status_code == 200 and dead.json()["degraded"] == ["llm"]
        assert [s["score"] for s in dead.json()["scores"]] == pytest.approx(expected, abs=1e-6)
        assert degraded_llm_count(client) == degraded_before + 2
        unreachable = ctr(bare, "1", ITEMS, retrieval="recent")
        assert unreachable.status_code == 503 and unreachable.json()["error"]["dependency"] == "vllm"


def test_engine_errors_fall_back_to_the_crm(crm_fallback_settings, tiny_engine):
    # The real engine answers 404 for a model it does not serve: an erroring engine.
    erroring = crm_fallback_settings.replace(**{"engine_model_name": "not-served-here"})
    with TestClient(create_app(erroring), headers=AUTH) as client:
        response = ctr(client, "1", ITEMS, retrieval="recent")
        assert response.status_code == 200 and response.json()["degraded"] == ["llm"]
    with TestClient(create_app(erroring.replace(**{"crm": None})), headers=AUTH) as client:
        response = ctr(client, "1", ITEMS, retrieval="recent")
        assert response.status_code == 503 and response.json()["error"]["dependency"] == "vllm"
