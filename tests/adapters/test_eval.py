"""`lorec eval` on a small slice: through the running gateway, offline with transformers + peft, agreeing."""

from __future__ import annotations

import json
import subprocess

import httpx

from tests.conftest import LOREC, ML100K


def _eval(base: str, env: dict, *args: str) -> dict:
    """`lorec eval` of the tiny adapter through the running gateway; its JSON result."""
    command = [LOREC, "eval", "--dir", str(ML100K), "--gateway", base, "--adapter", "tiny-random-v1", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_lorec_eval_small_slice_agrees_with_offline(http_gateway, tmp_path):
    base, env, _ = http_gateway
    out = tmp_path / "quality.json"
    result = _eval(base, env, "--n", "24", "--k", "5", "--method", "reit-test", "--out", str(out))
    assert result["n_test"] == 24 and result["kind"] == "llm" and 0 <= result["auc"] <= 1
    assert result["offline"]["prompt_mismatches"] == 0
    assert result["offline"]["mean_abs_delta_p"] < 0.01
    recorded = json.loads(out.read_text())["ml-100k"]["reit-test"]
    assert recorded["auc"] == result["auc"] and recorded["command"].startswith("lorec eval --dir")


def test_lorec_eval_checks_a_seeded_part_offline_when_told(http_gateway, tmp_path):
    """--offline-n: the figures are the gateway's on every sample, the offline reference scores a seeded part."""
    base, env, _ = http_gateway
    result = _eval(base, env, "--n", "24", "--k", "5", "--offline-n", "6", "--out", str(tmp_path / "quality.json"))
    assert result["n_test"] == 24 and result["offline"]["n"] == 6
    assert result["offline"]["prompt_mismatches"] == 0 and result["offline"]["mean_abs_delta_p"] < 0.01


async def _post_against(statuses: list[int], monkeypatch) -> tuple[dict | Exception, int]:
    """`_post` against a gateway answering `statuses` in turn (then 200); its result or error, and the calls made."""
    from adapters import evaluate

    monkeypatch.setattr(evaluate, "RETRY_WAITS_S", (0.0, 0.0, 0.0))
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status = statuses[len(calls) - 1] if len(calls) <= len(statuses) else 200
        return httpx.Response(status, json={"scores": [{"score": 0.5}]} if status == 200 else {"error": "x"})

    async with httpx.AsyncClient(base_url="http://gw", transport=httpx.MockTransport(answer)) as client:
        try:
            return await evaluate._post(client, {"user_id": "1"}, "sample 7"), len(calls)
        except RuntimeError as error:
            return error, len(calls)


async def test_gateway_dependency_faults_are_retried_then_name_the_sample(monkeypatch):
    """A 503/504 (engine or store hiccup) is tried again; a lasting one, or a client error, fails naming the sample."""
    body, calls = await _post_against([503, 504], monkeypatch)
    assert body == {"scores": [{"score": 0.5}]} and calls == 3
    error, calls = await _post_against([503] * 10, monkeypatch)
    assert isinstance(error, RuntimeError) and "503 for sample 7" in str(error) and calls == 4
    error, calls = await _post_against([422], monkeypatch)
    assert isinstance(error, RuntimeError) and "422 for sample 7" in str(error) and calls == 1


def test_slates_are_one_users_consecutive_distinct_items():
    from adapters.evaluate import slates
    from adapters.samples import Sample

    pool = [Sample(user_id=f"u{u}", item_id=f"i{(u * 7 + t) % 9}", ts=100 + t, label=t % 2, timeline=(), end=0)
            for u in range(6) for t in range(12)]
    groups = slates(pool, 5, 4, seed=3)
    assert groups == slates(pool, 5, 4, seed=3) and len(groups) == 5
    for group in groups:
        assert len({s.user_id for s in group}) == 1 and 1 <= len(group) <= 4
        assert [s.ts for s in group] == sorted(s.ts for s in group)
        assert len({s.item_id for s in group}) == len(group)


def test_lorec_eval_scores_slates_through_the_gateway(http_gateway, tmp_path):
    base, env, _ = http_gateway
    result = _eval(base, env, "--n", "20", "--slate-size", "5", "--retrieval", "slate",
                   "--out", str(tmp_path / "q.json"))
    assert result["slates"] == 4 and 4 <= result["n_test"] <= 20 and 0 <= result["auc"] <= 1
