"""Typed artifacts round-trip through their files and refuse a format or version they do not know."""

from __future__ import annotations

import json

import pytest

from adapters.train import RunState, UnknownRunFormat
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
