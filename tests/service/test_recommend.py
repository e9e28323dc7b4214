"""The request flow (service/recommend.py) and routing on in-memory fakes: scorer choice, fallbacks,
degradations and deadlines in milliseconds, without Redis, Qdrant or vLLM."""

from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np
import pytest

from service.artifacts import AdapterManifest
from service.combine import CombinerManifest, ComponentRef, LlmRef, Scorers, combiner_dir, llm_logit, open_combiner
from service.errors import ApiError
from service.feature_vector import FeatureSpec
from service.features import FeatureReader
from service.metrics import Metrics
from service.prompt import PromptCodec
from service.recommend import Limits, RecommendService, ScoreQuery
from service.records import Behaviour, Item, Profile
from service.routing import AdapterRegistry, AdapterUnservable, Router
from service.scoring import EngineError
from tests.utils.fakes import FakeCrm, FakeEngine, FakeHistory, FakeIndex, WordTokenizer

ADAPTER = "shared-v1"
ITEMS = [Item(str(i), f"Film {i}", 1990 + i, ("Drama",) if i % 2 else ("Comedy", "Drama")) for i in range(1, 9)]
EVENTS = {"u": [Behaviour(str(i), 100 * i, float(1 + i % 5)) for i in range(1, 6)],
          "v": [Behaviour(str(i), 50 * i, 5.0) for i in range(1, 9)],
          "w": [Behaviour(str(i), 60 * i, 2.0) for i in range(4, 9)]}
SPEC = FeatureSpec(genres=("Comedy", "Drama"), occupations=())


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def world(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    (tmp_path / "adapters" / ADAPTER).mkdir(parents=True)
    (tmp_path / "adapters" / ADAPTER / "adapter_config.json").write_text("{}")
    (tmp_path / "adapters" / ADAPTER / "adapter_model.safetensors").write_bytes(b"weights")
    engine, crm = FakeEngine(), FakeCrm(SPEC)
    CombinerManifest.new(name="c", dataset="test", data_fingerprint="f",
                         crm=ComponentRef(name=crm.name, version=crm.version),
                         llm=LlmRef(mode="shared", name=ADAPTER, version=registry.version(ADAPTER)),
                         terms=["llm", "crm"], weights=[0.5, 1.0], intercept=0.1, n_fit=1, fitted_on={},
                         validation={}).save(combiner_dir(tmp_path, "c"))
    history = FakeHistory(ITEMS, EVENTS, {"u": Profile(gender="female", age="25")})
    index = FakeIndex({i.item_id: np.array([1.0, float(i.item_id)]) for i in ITEMS})
    router = Router(registry, engine, ADAPTER, "shared")

    def service(scorer="hybrid", with_crm=True, deadline_s=5.0):
        combiner = open_combiner(tmp_path, "c")
        return RecommendService(
            history, index, PromptCodec(WordTokenizer()), engine, router, Metrics(), default_k=3,
            default_mode="subr", limits=Limits(max_candidates=50, max_prompt_tokens=500, deadline_s=deadline_s,
                                               retrieval_timeout_s=0.5),
            scorers=Scorers(scorer, with_crm, combiner if with_crm else None, {}),
            crm=crm if with_crm else None, features=FeatureReader(history, SPEC) if with_crm else None)

    return {"service": service, "engine": engine, "crm": crm, "index": index, "router": router,
            "registry": registry}


def query(**options) -> ScoreQuery:
    return ScoreQuery(user_id="u", item_ids=["6", "7", "8"], as_of=10_000, **options)


async def test_hybrid_combines_the_two_logits_with_the_combiners_weights(world):
    result = await world["service"]().score(query(explain=True))
    assert result.scorer == "hybrid" and result.combiner == "c" and result.adapter == ADAPTER
    for s in result.scored:
        expected = sigmoid(0.5 * llm_logit(s.llm.p_yes) + 1.0 * llm_logit(s.crm) + 0.1)
        assert s.score == pytest.approx(expected, abs=1e-9)
    assert {"features", "crm", "engine", "combine"} <= set(result.timings)


async def test_the_crm_alone_calls_neither_the_engine_nor_the_index(world):
    world["index"].fail = OSError("qdrant down")
    result = await world["service"]().score(query(scorer="crm"))
    assert result.scorer == "crm" and result.adapter == "crm:fake-crm" and result.adapter_mode == "crm"
    assert world["engine"].calls == [] and not result.degraded
    assert all(s.llm is None and s.score == s.crm for s in result.scored)


async def test_a_hybrid_whose_combiner_kept_the_crm_alone_calls_neither_the_engine_nor_the_index(world, tmp_path):
    manifest = CombinerManifest.load(combiner_dir(tmp_path, "c"))
    manifest.model_copy(update={"name": "crm-only", "terms": ["crm"], "weights": [0.9], "intercept": -0.2}).save(
        combiner_dir(tmp_path, "crm-only"))
    service = world["service"]()
    service.scorers = Scorers("hybrid", True, open_combiner(tmp_path, "crm-only"), {})
    world["index"].fail = OSError("qdrant down")
    result = await service.score(query(explain=True))
    assert result.scorer == "hybrid" and result.combiner == "crm-only" and not result.degraded
    assert result.adapter == "crm:fake-crm" and result.adapter_mode == "crm" and world["engine"].calls == []
    assert "engine" not in result.timings and "combine" in result.timings
    for s in result.scored:
        assert s.llm is None and s.score == pytest.approx(sigmoid(0.9 * llm_logit(s.crm) - 0.2), abs=1e-9)


async def test_the_llm_alone_serves_the_llms_answer(world):
    explained = await world["service"]().score(query(scorer="llm", explain=True))
    assert all(s.crm is not None for s in explained.scored)  # computed when a CRM is configured: explain shows it
    assert [s.score for s in explained.scored] == [s.llm.p_yes for s in explained.scored]
    assert explained.combiner is None


def with_estimate_adapter(world, name: str, prompt_crm: str) -> None:
    """An adapter in the registry whose manifest says its prompts show `prompt_crm`'s estimate."""
    folder = world["registry"].root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"other weights")
    AdapterManifest.new(name=name, base_model="m", prompt_crm=prompt_crm).save(folder)


async def test_an_adapter_trained_on_the_crms_estimate_gets_it_in_each_prompt(world):
    with_estimate_adapter(world, "shown-v1", "fake-crm@000000000001")
    service = world["service"]()
    service.router = Router(world["registry"], world["engine"], ADAPTER, "shared", crm="fake-crm@000000000001")
    result = await service.score(query(adapter="shown-v1", scorer="llm", explain=True))
    words = {i: w for w, i in service.codec.tokenizer.vocab.items()}
    for s in result.scored:
        text = "".join(words.get(i, "") for i in s.prompt)
        percent = round(100 * s.crm)
        assert f"gives a {percent}% chance that the user likes it." in text, text
        assert text.index("Will the user like") < text.index("gives a") < text.index("Answer only")
    plain = await service.score(query(scorer="llm"))  # the shared adapter's manifest names no CRM
    assert all("%" not in "".join(words.get(i, "") for i in s.prompt) for s in plain.scored)


async def test_an_adapter_reading_another_crms_estimate_is_refused_by_name_and_skipped_by_default(world):
    with_estimate_adapter(world, "shown-v1", "other-crm@000000000009")
    router = Router(world["registry"], world["engine"], "shown-v1", "shared", crm="fake-crm@000000000001")
    with pytest.raises(AdapterUnservable, match="other-crm@000000000009"):
        await router.route(context(), "shown-v1", None)
    route = await router.route(context(), None, None)
    assert route.mode == "base" and "fake-crm@000000000001" in route.fallbacks[0]["reason"]
    assert world["engine"].loaded == set(), "nothing was loaded for a prompt the gateway cannot write"


async def test_an_engine_error_falls_back_to_the_crm_and_says_so(world):
    world["engine"].error = EngineError("engine answered 500")
    result = await world["service"]().score(query())
    assert result.scorer == "crm" and result.degraded == ["llm"] and result.adapter_mode == "crm"
    with pytest.raises(EngineError):
        await world["service"](scorer="llm", with_crm=False).score(query())


async def test_an_engine_past_the_deadline_is_left_behind_in_time(world):
    world["engine"].delay_s = 2.0
    service = world["service"](deadline_s=0.3)  # built first: it compiles the features' kernels where uncached
    started = time.monotonic()
    result = await service.score(query())
    assert time.monotonic() - started < 1.0
    assert result.scorer == "crm" and result.degraded == ["llm"]


async def test_a_failing_index_degrades_to_recent_history(world):
    world["index"].fail = TimeoutError()
    result = await world["service"]().score(query(scorer="llm", k=2))
    assert result.degraded == ["retrieval"]
    assert all([b.item_id for b in s.behaviours] == ["4", "5"] for s in result.scored)


async def test_unknown_items_are_refused_or_skipped(world):
    service = world["service"]()
    with pytest.raises(ApiError) as refused:
        await service.score(ScoreQuery(user_id="u", item_ids=["6", "nope"], as_of=10_000))
    assert refused.value.body.code == 404 and refused.value.body.field == "item_ids"
    result = await service.score(ScoreQuery(user_id="u", item_ids=["6", "nope"], as_of=10_000, skip_unknown=True))
    assert result.skipped == ["nope"] and [s.item_id for s in result.scored] == ["6"]


async def test_a_hybrid_request_routed_to_another_llm_is_answered_by_the_crm(world):
    result = await world["service"]().score(query(adapter="base"))
    assert result.scorer == "crm" and not result.degraded
    assert result.fallbacks[0]["mode"] == "hybrid" and "routed to" in result.fallbacks[0]["reason"]
    assert world["engine"].calls == [], "no engine work for answers that cannot be combined"


async def test_without_a_combiner_the_hybrid_hands_over_to_the_crm(world):
    service = world["service"]()
    service.scorers = Scorers("hybrid", True, None, {"hybrid": "combiner refused: fitted for CRM x"})
    result = await service.score(query())
    assert result.scorer == "crm" and result.fallbacks[0] == {"mode": "hybrid",
                                                              "reason": "combiner refused: fitted for CRM x"}


async def test_rank_orders_by_the_served_score(world):
    result = await world["service"]().rank(query(), top_k=2)
    assert len(result.scored) == 2 and result.scored[0].score >= result.scored[1].score


# --- routing ---------------------------------------------------------------------------------


def context():
    from service.records import UserContext

    return UserContext.of("u", Profile(), EVENTS["u"])


async def test_a_missing_shared_adapter_falls_back_to_the_base_model(world):
    router = Router(world["registry"], world["engine"], "gone-v1", "shared")
    route = await router.route(context(), None, None)
    assert route.adapter is None and route.mode == "base"
    assert route.fallbacks[0]["mode"] == "shared" and "no such adapter" in route.fallbacks[0]["reason"]


async def test_a_refused_adapter_is_quarantined_and_not_retried(world):
    world["engine"].refuse.add(ADAPTER)
    router = world["router"]
    first = await router.route(context(), None, None)
    assert first.mode == "base" and ADAPTER in router.quarantined
    world["engine"].refuse.clear()
    again = await router.route(context(), None, None)
    assert again.mode == "base" and "quarantined" in again.fallbacks[0]["reason"]


async def test_a_bug_in_the_personalizer_surfaces_instead_of_becoming_a_fallback(world):
    class Broken:
        needs_features = False

        def personal(self, context):
            raise KeyError("a bug")

    router = Router(world["registry"], world["engine"], ADAPTER, "personal", personalizer=Broken())
    with pytest.raises(KeyError):
        await router.route(context(), None, None)


async def test_no_bank_is_a_named_fallback(world):
    route = await Router(world["registry"], world["engine"], ADAPTER, "personal").route(context(), None, None)
    assert route.mode == "shared" and [f["mode"] for f in route.fallbacks] == ["personal", "cohort"]
    assert json.dumps(route.fallbacks)  # reasons are plain text


def _on_the_wire(history, log: list[str], history_error: Exception | None = None) -> None:
    """The history's reads as redis-py 8 sends commands on Python 3.11 (written from wait_for's task, then the
    round trip), recording the order of writes and replies."""
    load, stats = history.load_request, history.item_stats

    async def sent(name: str) -> None:
        async def write() -> None:
            log.append(f"{name} written")
        await asyncio.wait_for(asyncio.ensure_future(write()), 5)
        await asyncio.sleep(0.01)
        log.append(f"{name} replied")

    async def load_request(*args):
        await sent("history")
        if history_error is not None:
            raise history_error
        return await load(*args)

    async def item_stats(*args):
        await sent("stats")
        return await stats(*args)
    history.load_request, history.item_stats = load_request, item_stats


async def test_the_features_statistics_are_read_behind_the_history_and_arrive_with_it(world):
    service, log = world["service"](), []
    expected = await service.score(query(scorer="crm", explain=True))
    _on_the_wire(service.history, log)
    result = await service.score(query(scorer="crm", explain=True))
    assert log[:3] == ["history written", "stats written", "history replied"], \
        "the history, awaited first, goes out first, and the statistics' round trip overlaps it"
    assert [s.score for s in result.scored] == [s.score for s in expected.scored]


@pytest.mark.parametrize("fault", ["unknown item", "history read fails"])
async def test_a_request_that_fails_before_its_features_leaves_no_read_running(world, fault):
    service, log = world["service"](), []
    _on_the_wire(service.history, log, ConnectionError("redis away") if fault == "history read fails" else None)
    with pytest.raises(ApiError if fault == "unknown item" else ConnectionError):
        await service.score(ScoreQuery(user_id="u", item_ids=["6", "nope"], as_of=10_000))
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert "stats replied" not in log or fault == "unknown item"
