"""The hybrid score: a combiner fitted through a real gateway on validation samples, then served."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from fastapi.testclient import TestClient

from adapters.combiner import NotValidation, fit_from_gateway, require_validation
from adapters.features import ItemTimes
from adapters.samples import build_samples, draw, split_by_time
from service.app import create_app
from service.combine import CombinerManifest, combiner_dir
from service.ingest import read_movielens
from service.processes import Managed, free_port
from tests.utils.crm import build_crm
from tests.utils.http import ctr
from tests.utils.stack import AUTH, LOREC, ML100K, serve_env

CRM, ADAPTER, COMBINER = "hybrid-gbdt", "tiny-random-v1", "test-combiner"


@pytest.fixture(scope="module")
def parts():
    data = read_movielens(ML100K)
    return data, split_by_time(build_samples(data))


@pytest.fixture(scope="module")
def hybrid_settings(tiny_settings, tmp_path_factory):
    """The tiny deployment with a CRM and a shared adapter, and a combiner fitted through `lorec serve`."""
    data_dir = tmp_path_factory.mktemp("hybrid") / "data"
    shutil.copytree(tiny_settings.data_dir, data_dir)
    build_crm(data_dir, ML100K, CRM)
    settings = tiny_settings.replace(**{"data_dir": data_dir, "crm": CRM, "default_adapter": ADAPTER,
                                                "adapter_mode": "shared"})
    port = free_port()
    env = {**serve_env(settings, tmp_path_factory.mktemp("hybrid-serve") / "data", port), "LOREC_CRM": CRM,
           "LOREC_DEFAULT_ADAPTER": ADAPTER, "LOREC_ADAPTER_MODE": "shared"}
    server = Managed("gateway", [LOREC, "serve"], data_dir.parent / "gateway.log", env=env)
    try:
        server.wait_http(f"http://127.0.0.1:{port}/readyz", 120)
        # the tiny random model adds nothing to the CRM: the sets with the LLM only, to serve a combination
        fit_from_gateway(settings, ML100K, f"http://127.0.0.1:{port}", n=150, seed=2, k=5, retrieval="recent",
                         name=COMBINER, journal_dir=None, term_sets=("stack", "stack-counts"))
    finally:
        server.stop()
    return settings.replace(**{"combiner": COMBINER})


@pytest.fixture(scope="module")
def client(hybrid_settings):
    with TestClient(create_app(hybrid_settings), headers=AUTH) as c:
        yield c


def ctr13(client, item_ids, **options):
    return ctr(client, "13", item_ids, as_of=880_000_000, retrieval="recent", k=5, **options)


def test_the_combiner_names_its_components_and_was_fitted_on_validation(hybrid_settings, parts):
    manifest = CombinerManifest.load(combiner_dir(hybrid_settings.data_dir, COMBINER))
    assert manifest.crm.name == CRM and manifest.llm.mode == "shared" and manifest.llm.name == ADAPTER
    assert manifest.fitted_on == {"split": "valid", "seed": 2, "n": 150, "k": 5, "retrieval": "recent"}
    assert manifest.validation["chosen"] in manifest.validation["term_sets"]
    assert len(manifest.weights) == len(manifest.terms) and "llm" in manifest.terms and "crm" in manifest.terms


def test_test_samples_never_reach_the_fit(parts):
    _, split = parts
    require_validation(draw(split["valid"], 50, 0), split["valid"])
    with pytest.raises(NotValidation, match="validation only"):
        require_validation([*draw(split["valid"], 50, 0), split["test"][0]], split["valid"])


def test_hybrid_is_the_default_and_explains_its_components(client, hybrid_settings, parts):
    data, _ = parts
    items = ["1", "50", "100", "1600"]
    body = ctr13(client, items, explain=True).json()
    assert body["scorer"] == "hybrid" and body["combiner"] == COMBINER and body["adapter"] == ADAPTER
    manifest = CombinerManifest.load(combiner_dir(hybrid_settings.data_dir, COMBINER))
    weights = dict(zip(manifest.terms, manifest.weights))
    counts = ItemTimes(data.ratings)
    for s in body["scores"]:
        llm, crm = (math.log(p / (1 - p)) for p in (s["components"]["llm"], s["components"]["crm"]))
        bases = {"llm": llm, "crm": crm, "log_u_n": math.log1p(body["history_size"]),
                 "log_i_n": math.log1p(sum(counts.stats(s["item_id"], 880_000_000).counts[:5]))}
        logit = manifest.intercept + sum(w * math.prod(bases[b] for b in term.split("*"))
                                         for term, w in weights.items())
        assert s["score"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)
        assert math.exp(s["logprob_yes"]) / (math.exp(s["logprob_yes"]) + math.exp(s["logprob_no"])) \
            == pytest.approx(s["components"]["llm"], abs=1e-6)
    scorers = client.get("/v1/adapters").json()["scorers"]
    assert scorers["serving"] == "hybrid" and scorers["combiner"] == COMBINER and scorers["crm"].startswith(CRM)


def test_each_component_alone_on_request(client):
    items = ["1", "50", "100"]
    both = {s["item_id"]: s["components"] for s in ctr13(client, items, explain=True).json()["scores"]}
    crm = ctr13(client, items, scorer="crm").json()
    assert crm["scorer"] == "crm" and crm["adapter_mode"] == "crm" and crm["adapter"] == f"crm:{CRM}"
    assert all("logprob_yes" not in s for s in crm["scores"])
    assert [s["score"] for s in crm["scores"]] == pytest.approx([both[i]["crm"] for i in items], abs=1e-9)
    llm = ctr13(client, items, scorer="llm").json()
    assert llm["scorer"] == "llm" and llm["adapter_mode"] == "shared" and "combiner" not in llm
    assert [s["score"] for s in llm["scores"]] == pytest.approx([both[i]["llm"] for i in items], abs=1e-6)


def test_an_unknown_scorer_is_refused_naming_the_field(client):
    response = ctr13(client, ["1"], scorer="magic")
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "options.scorer"


def test_a_request_routed_to_another_llm_is_answered_by_the_crm_and_says_why(client):
    body = ctr13(client, ["1", "50"], adapter="base").json()
    assert body["scorer"] == "crm" and "degraded" not in body
    assert body["fallbacks"][0]["mode"] == "hybrid" and "routed to" in body["fallbacks"][0]["reason"]


def test_engine_failure_in_hybrid_falls_back_to_the_crm_flagged(hybrid_settings):
    # A second app beside the module's: qdrant-client's local mode (one process opens an Edge shard at a time).
    unreachable = hybrid_settings.replace(**{"engine_url": f"http://127.0.0.1:{free_port()}",
                                                     "qdrant_url": ":memory:"})
    with TestClient(create_app(unreachable), headers=AUTH) as c:
        body = ctr13(c, ["1", "50"]).json()
    assert body["scorer"] == "crm" and body["degraded"] == ["llm"] and body["adapter_mode"] == "crm"


def test_a_combiner_that_kept_the_crm_alone_serves_the_hybrid_without_the_engine(hybrid_settings):
    # the fit's outcome where the LLM beat the CRM alone in no term set: the CRM's logit, recalibrated
    folder = combiner_dir(hybrid_settings.data_dir, "crm-alone")
    shutil.copytree(combiner_dir(hybrid_settings.data_dir, COMBINER), folder, dirs_exist_ok=True)
    raw = json.loads((folder / "manifest.json").read_text())
    raw.update(name="crm-alone", terms=["crm"], weights=[0.8], intercept=-0.1)
    (folder / "manifest.json").write_text(json.dumps(raw))
    no_engine = hybrid_settings.replace(**{"combiner": "crm-alone", "qdrant_url": ":memory:",
                                           "engine_url": f"http://127.0.0.1:{free_port()}"})
    with TestClient(create_app(no_engine), headers=AUTH) as c:
        scorers = c.get("/v1/adapters").json()["scorers"]
        response = ctr13(c, ["1", "50", "100"], explain=True)
        body = response.json()
        alone = ctr13(c, ["1", "50", "100"], scorer="crm").json()
    assert scorers["serving"] == "hybrid" and scorers["hybrid_calls_llm"] is False
    assert body["scorer"] == "hybrid" and body["combiner"] == "crm-alone" and "degraded" not in body
    assert body["adapter_mode"] == "crm" and body["adapter"] == f"crm:{CRM}"
    assert "engine" not in response.headers["server-timing"] and "crm" in response.headers["server-timing"]
    for served, crm in zip(body["scores"], alone["scores"]):
        assert "llm" not in served["components"] and "logprob_yes" not in served
        crm_logit = math.log(crm["score"] / (1 - crm["score"]))
        assert served["score"] == pytest.approx(1 / (1 + math.exp(-(0.8 * crm_logit - 0.1))), abs=1e-9)


def test_a_combiner_fitted_for_another_crm_is_refused_at_start(hybrid_settings):
    folder = combiner_dir(hybrid_settings.data_dir, COMBINER)
    stale = combiner_dir(hybrid_settings.data_dir, "stale-combiner")
    shutil.copytree(folder, stale, dirs_exist_ok=True)
    raw = json.loads((stale / "manifest.json").read_text())
    raw["name"], raw["crm"]["version"] = "stale-combiner", "000000000000"
    (stale / "manifest.json").write_text(json.dumps(raw))
    with TestClient(create_app(hybrid_settings.replace(**{"combiner": "stale-combiner",
                                                                  "qdrant_url": ":memory:"})), headers=AUTH) as c:
        scorers = c.get("/v1/adapters").json()["scorers"]
        body = ctr13(c, ["1", "50"]).json()
    assert scorers["serving"] == "crm" and "fitted for CRM" in scorers["unavailable"]["hybrid"]
    assert body["scorer"] == "crm" and body["fallbacks"][0]["mode"] == "hybrid"
    assert "fitted for CRM" in body["fallbacks"][0]["reason"]


def test_a_combiner_of_an_unknown_format_version_is_refused(hybrid_settings):
    folder = combiner_dir(hybrid_settings.data_dir, "future-combiner")
    shutil.copytree(combiner_dir(hybrid_settings.data_dir, COMBINER), folder, dirs_exist_ok=True)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(raw))
    with TestClient(create_app(hybrid_settings.replace(**{"combiner": "future-combiner",
                                                                  "qdrant_url": ":memory:"})), headers=AUTH) as c:
        reason = c.get("/v1/adapters").json()["scorers"]["unavailable"]["hybrid"]
    assert "format version 99" in reason


def test_rank_orders_by_the_hybrid_score(client):
    ranked = client.post("/v1/rank", json={"user_id": "13", "item_ids": ["1", "50", "100", "181"],
                                           "as_of": 880_000_000, "options": {"retrieval": "recent", "k": 5}}).json()
    scores = [i["score"] for i in ranked["items"]]
    assert scores == sorted(scores, reverse=True) and ranked["scorer"] == "hybrid"


def test_ship_then_install_into_a_fresh_data_folder_serves_the_hybrid(hybrid_settings, parts, tmp_path):
    """`lorec ship` writes the served default with its manifest; `lorec up` / `lorec serve` install it into a
    data folder that configures no model, for the same data and base model only."""
    from adapters.ship import ship
    from service.shipped import ShippedManifest, install_shipped

    data, _ = parts
    root = tmp_path / "shipped"
    out = ship(hybrid_settings, "ml-100k", data.fingerprint, tmp_path / "no-quality.json", root=root)
    manifest = ShippedManifest.load(out)
    assert (manifest.adapter, manifest.crm, manifest.combiner) == (ADAPTER, CRM, COMBINER)
    assert (out / "adapters" / ADAPTER / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("optimizer.pt")), "no training state ships"
    model_dir = str(hybrid_settings.model_dir.resolve())
    assert not [f for f in out.rglob("*.json") if model_dir in f.read_text()], "no path of this machine ships"

    fresh = hybrid_settings.replace(**{"data_dir": tmp_path / "fresh", "adapter_dir": None, "crm": None,
                                               "combiner": None, "default_adapter": None, "qdrant_url": ":memory:"})
    assert install_shipped(fresh, "another-fingerprint", root) == fresh
    assert install_shipped(fresh.replace(crm="mine"), data.fingerprint, root).scoring.crm == "mine"
    installed = install_shipped(fresh, data.fingerprint, root)
    assert (installed.adapters.default, installed.scoring.crm, installed.scoring.combiner) == (ADAPTER, CRM, COMBINER)
    config = json.loads((installed.registry_dir / ADAPTER / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(installed.model_dir.resolve())
    assert install_shipped(fresh, data.fingerprint, root) == installed, "installing again changes nothing"
    with TestClient(create_app(installed), headers=AUTH) as c:
        assert c.get("/v1/adapters").json()["scorers"]["serving"] == "hybrid"
        assert ctr13(c, ["1", "50"]).json()["scorer"] == "hybrid"


def test_models_of_another_base_model_are_not_installed(hybrid_settings, parts, tmp_path):
    from adapters.ship import ship
    from service.shipped import install_shipped

    data, _ = parts
    root = tmp_path / "shipped"
    ship(hybrid_settings, "ml-100k", data.fingerprint, tmp_path / "none.json", root=root)
    other_model = tmp_path / "other-model"
    other_model.mkdir()
    (other_model / "config.json").write_text('{"model_type": "other"}')
    fresh = hybrid_settings.replace(**{"data_dir": tmp_path / "fresh", "model": other_model, "crm": None,
                                               "combiner": None, "default_adapter": None, "adapter_dir": None})
    assert install_shipped(fresh, data.fingerprint, root) == fresh
