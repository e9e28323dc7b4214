"""Typed artifacts round-trip through their files and refuse a format or version they do not know."""

from __future__ import annotations

import json

import pytest

from adapters.runs import RunState, UnknownRunFormat
from service.artifacts import ArtifactError
from service.combine import CombinerManifest, ComponentRef, LlmRef


def test_run_state_round_trips_and_reads_runs_written_before_it_was_versioned(tmp_path):
    state = RunState(settings={"batch_size": 8}, n_train=64, n_valid=10, step=16, best={"step": 8, "auc": 0.6},
                     evals=[{"step": 8, "auc": 0.6}, {"step": 16, "auc": 0.55}], stale=1, seconds=12.5)
    assert RunState.from_json(state.to_json(), tmp_path) == state
    assert state.epochs() == 1.0
    legacy = {k: v for k, v in json.loads(state.to_json()).items() if not k.startswith("format")}
    assert RunState.from_json(json.dumps(legacy), tmp_path) == state


@pytest.mark.parametrize("change", [{"format_version": 2}, {"format": "lorec.crm"}, {"renamed_field": 1}])
def test_run_state_of_another_format_is_refused(change, tmp_path):
    raw = {**json.loads(RunState(settings={}, n_train=1, n_valid=1).to_json()), **change}
    with pytest.raises(UnknownRunFormat):
        RunState.from_json(json.dumps(raw), tmp_path / "state.json")


def _combiner() -> CombinerManifest:
    return CombinerManifest.new(name="c", dataset="d", data_fingerprint="f", crm=ComponentRef(name="m", version="v"),
                                llm=LlmRef(mode="shared", name="a", version="w"), terms=["llm"], weights=[1.0],
                                intercept=0.0, n_fit=3, fitted_on={"split": "valid"}, validation={})


def test_manifests_round_trip_and_refuse_unknown_versions_and_kinds(tmp_path):
    manifest = _combiner()
    manifest.save(tmp_path / "c")
    assert CombinerManifest.load(tmp_path / "c") == manifest
    raw = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**raw, "format_version": 9}))
    with pytest.raises(ArtifactError, match="format version 9"):
        CombinerManifest.load(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**raw, "format": "lorec.crm"}))
    with pytest.raises(ArtifactError, match="not 'lorec.combiner'"):
        CombinerManifest.load(tmp_path / "c")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        CombinerManifest.load(tmp_path / "missing")


def test_adapter_and_bank_manifests_read_their_unversioned_files_and_refuse_other_versions(tmp_path):
    from adapters.export import AdapterManifest
    from service.personalize import BankManifest

    legacy = {"name": "a", "base_model": "/m", "method": "reit", "validation": {"auc": 0.7}, "git_commit": "x",
              "created": "2026-01-01T00:00:00Z", "some_old_key": 1}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(legacy))
    assert AdapterManifest.load(tmp_path / "a").validation == {"auc": 0.7}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "reclora.json").write_text(json.dumps({"settings": {"rank": 8}, "user_dim": 64, "crm": "x.pt"}))
    assert BankManifest.load(tmp_path / "b").crm == "x.pt"
    versioned = BankManifest.new(settings={"rank": 8}, user_dim=4)
    versioned.save(tmp_path / "c")
    assert BankManifest.load(tmp_path / "c") == versioned
    raw = json.loads((tmp_path / "c" / "reclora.json").read_text())
    (tmp_path / "c" / "reclora.json").write_text(json.dumps({**raw, "format_version": 2}))
    with pytest.raises(ArtifactError, match="format version 2"):
        BankManifest.load(tmp_path / "c")


def test_bundle_meta_round_trips_and_refuses_other_formats(tmp_path):
    from adapters.bundle import BundleMeta, UnknownBundleFormat

    meta = BundleMeta(dataset="ml-100k", data_fingerprint="f", split_sizes={"train": 1}, n_train=8, k=4, seed=0,
                      retrieval="subr", test_seed=0, model="m", answer={"yes": 1, "no": 2}, pad_id=0)
    assert BundleMeta.from_json(meta.to_json(), tmp_path) == meta
    with pytest.raises(UnknownBundleFormat):
        BundleMeta.from_json(json.dumps({**json.loads(meta.to_json()), "format_version": 3}), tmp_path)
