"""`lorec eval` on a small slice: through the running gateway, offline with transformers + peft, agreeing."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from tests.utils.stack import LOREC, ML100K

REAL_CLIENT = httpx.AsyncClient  # the fake gateway below patches httpx's, a second time too


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


def test_lorec_eval_resumes_from_its_journal(http_gateway, tmp_path):
    """--journal-dir: a re-run of the same evaluation reads the scores back instead of asking the gateway."""
    base, env, _ = http_gateway
    args = ("--n", "12", "--k", "5", "--no-offline", "--journal-dir", str(tmp_path / "eval"),
            "--out", str(tmp_path / "quality.json"))
    first = _eval(base, env, *args)
    [journal] = (tmp_path / "eval").glob("ml-100k-tiny-random-v1-*.jsonl")
    lines = journal.read_text().splitlines()
    assert len(lines) == 13 and "resumed_from_journal" not in first
    journal.write_text("\n".join(lines[:6]) + "\n")  # cut short after 5 samples
    second = _eval(base, env, *args)
    assert second["resumed_from_journal"] == 5 and len(journal.read_text().splitlines()) == 13
    assert second["auc"] == pytest.approx(first["auc"]) and second["logloss"] == pytest.approx(first["logloss"])
    other = _eval(base, env, *args[:2], "--k", "4", *args[4:])  # another evaluation: its own journal
    assert "resumed_from_journal" not in other and len(list((tmp_path / "eval").glob("*.jsonl"))) == 2


def test_lorec_eval_checks_a_seeded_part_offline_when_told(http_gateway, tmp_path):
    """--offline-n: the figures are the gateway's on every sample, the offline reference scores a seeded part."""
    base, env, _ = http_gateway
    result = _eval(base, env, "--n", "24", "--k", "5", "--offline-n", "6", "--out", str(tmp_path / "quality.json"))
    assert result["n_test"] == 24 and result["offline"]["n"] == 6
    assert result["offline"]["prompt_mismatches"] == 0 and result["offline"]["mean_abs_delta_p"] < 0.01


async def _post_against(statuses: list[int], monkeypatch) -> tuple[dict | Exception, int]:
    """`_post` against a gateway answering `statuses` in turn (then 200); its result or error, and the calls made."""
    from adapters import gateway_scores as evaluate

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


def _fake_samples(n: int):
    from adapters.samples import Sample

    return [Sample(user_id=f"u{i}", item_id=f"i{i}", ts=100 + i, label=i % 2, timeline=(), end=0) for i in range(n)]


def _gateway_answering(monkeypatch, failing_from: int | None, score: float) -> list[dict]:
    """Route the evaluation's client to a fake gateway scoring `score` (422 from call `failing_from` on);
    the request bodies it received."""
    from adapters import gateway_scores as evaluate

    bodies = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if failing_from is not None and len(bodies) > failing_from:
            return httpx.Response(422, json={"error": "x"})
        return httpx.Response(200, json={"adapter_mode": "named", "scores": [
            {"score": score, "prompt_token_ids": [len(bodies)]}]})

    fake = httpx.MockTransport(answer)
    monkeypatch.setattr(evaluate.httpx, "AsyncClient", lambda **kw: REAL_CLIENT(transport=fake, **kw))
    return bodies


async def test_a_journal_lets_a_cut_short_evaluation_go_on_where_it_stopped(monkeypatch, tmp_path):
    """Rows scored before a failure are kept; the re-run asks only for the rest, and a partial last line
    (a kill mid-write) is dropped, not read as a score."""
    from adapters.gateway_scores import score_via_gateway
    from adapters.journal import Journal

    samples, key, path = _fake_samples(10), {"adapter": "a", "n": 10}, tmp_path / "j.jsonl"
    _gateway_answering(monkeypatch, failing_from=4, score=0.25)
    with pytest.raises(RuntimeError, match="422 for sample 4"):
        await score_via_gateway("http://gw", samples, "a", 10, "subr", concurrency=1, journal=Journal(path, key))
    path.write_text(path.read_text() + '{"i": 4, "sam')
    journal = Journal(path, key)
    journal.load(samples)
    assert sorted(journal.rows) == [0, 1, 2, 3] and path.read_text().endswith("}\n")
    bodies = _gateway_answering(monkeypatch, failing_from=None, score=0.75)
    served = await score_via_gateway("http://gw", samples, "a", 10, "subr", concurrency=1, journal=journal)
    assert [b["user_id"] for b in bodies] == [f"u{i}" for i in range(4, 10)]
    assert served.scores == [0.25] * 4 + [0.75] * 6 and served.resumed == 4
    assert served.adapters == {"named": 10} and served.prompts[3] == [4] and served.prompts[4] == [1]
    again = Journal(path, key)
    again.load(samples)
    assert len(again.rows) == 10 and [again.rows[i]["score"] for i in range(10)] == served.scores


def test_a_journal_of_another_evaluation_or_other_samples_is_refused(tmp_path):
    from adapters.journal import Journal, JournalMismatch

    path = tmp_path / "j.jsonl"
    with Journal(path, {"adapter": "a"}).appender() as append:
        append(0, _fake_samples(1)[0], 0.5, [1, 2], "named")
    with pytest.raises(JournalMismatch, match="another evaluation"):
        Journal(path, {"adapter": "b"}).load(_fake_samples(3))
    shifted = _fake_samples(2)[1:]  # another draw: row 0 is not u0's sample
    with pytest.raises(JournalMismatch, match="line 2 is not this evaluation's sample 0"):
        Journal(path, {"adapter": "a"}).load(shifted)
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(JournalMismatch, match="line 3 is not a journal row"):
        Journal(path, {"adapter": "a"}).load(_fake_samples(3))


def test_slates_are_one_users_consecutive_distinct_items():
    from adapters.gateway_scores import slates
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


def test_a_journal_outlives_commits_that_do_not_touch_the_scoring_code(tmp_path):
    import subprocess

    from service.artifacts import code_version

    def commit(path: str, text: str) -> str | None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", path], check=True)
        return code_version(tmp_path)

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    commit("adapters/evaluate.py", "a")
    first = commit("service/scoring.py", "s")
    assert first is not None
    assert commit("README.md", "results") == first
    assert commit("adapters/shipped/ml-100k/manifest.json", "{}") == first
    assert commit("service/README.md", "docs") == first
    assert commit("service/scoring.py", "s2") != first
    assert code_version(tmp_path / "missing") is None
