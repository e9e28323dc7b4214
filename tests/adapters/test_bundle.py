"""Prompt bundles: the prompts the trainer and `lorec eval` build, carried to a machine that has only
torch + transformers + peft, fitted and scored there, exported back into the registry."""

from __future__ import annotations

import asyncio
import json

import pytest

from adapters import bundle
from adapters.samples import build_samples, draw, split_by_time
from service.ingest import read_movielens
from tests.utils.stack import ML100K


@pytest.fixture
def lorec_env(tiny_settings, tmp_path, monkeypatch):
    for key, value in {"LOREC_DATA_DIR": tiny_settings.data_dir, "LOREC_MODEL": tiny_settings.model,
                       "LOREC_REDIS_URL": tiny_settings.redis.url, "LOREC_ADAPTER_DIR": tmp_path / "registry"}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("QDRANT_URL", raising=False)
    return tmp_path


def _invoke(app, args):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bundle_holds_the_trainers_and_evals_prompts(gateway, tiny_settings, lorec_env):
    from adapters.offline import few_shot_prompts, prompted
    from service.cli import app
    from service.config import Settings

    path = lorec_env / "b.npz"
    out = _invoke(app, ["train", "prompts", "--dir", ML100K, "--n", 8, "--n-valid", 16, "--k", 4,
                        "--test-n", 12, "--out", path])
    assert (out["train"], out["valid"], out["test"]) == (16, 16, 12)
    loaded = bundle.load(path)
    assert loaded.meta.dataset == "ml-100k" and loaded.meta.split_sizes["train"] == 75599
    assert loaded.meta.n_train == 8 and loaded.meta.k == 4

    settings = Settings()
    shots = asyncio.run(few_shot_prompts(settings, ML100K, 8, 16, 4, 0))
    assert loaded.parts["train"] == bundle.from_prompted(shots.train)  # both views of each sample, same tokens
    assert [r.mode for r in loaded.parts["train"][:2]] == ["recent", "subr"]
    assert loaded.parts["valid"] == bundle.from_prompted(shots.valid)
    assert (loaded.answer, loaded.pad_id) == (shots.codec.answer, shots.codec.pad_id)
    # The test part is `lorec eval --n 12 --k 4`'s slice with its offline reference's prompts.
    test = draw(split_by_time(build_samples(read_movielens(ML100K)))["test"], 12, 0)
    assert [(r.user_id, r.item_id, r.ts, r.label) for r in loaded.parts["test"]] == \
        [(s.user_id, s.item_id, s.ts, s.label) for s in test]
    assert [r.input_ids for r in loaded.parts["test"]] == \
        [p.input_ids for p in asyncio.run(prompted(settings, shots.dataset.data, test, 4, "subr"))]


def test_fit_on_a_time_budget_export_and_score(gateway, tiny_settings, lorec_env):
    import torch

    from adapters.export import read_manifest
    from adapters.train import load_model, metrics, score
    from service.cli import app

    path = lorec_env / "b.npz"
    _invoke(app, ["train", "prompts", "--dir", ML100K, "--n", 8, "--n-valid", 16, "--k", 4, "--test-n", 12,
                  "--out", path])
    run_dir = lorec_env / "run"
    fitted = _invoke(bundle.app, ["fit", path, "--model", tiny_settings.model_dir, "--run-dir", run_dir,
                                  "--max-epochs", 2, "--eval-every", 3, "--batch-size", 4, "--max-seconds", 0])
    # Out of time after the first step: evaluated there, stopped, the best checkpoint kept.
    assert fitted["steps"] == 1 and fitted["stopped"] == "time" and fitted["best"]["step"] == 1
    assert (run_dir / "best" / "adapter_config.json").exists()

    # The finished run is exported, not trained again, under a name saying where its budget stopped it,
    # and its manifest says how it ended.
    out = _invoke(app, ["train", "reit", "--bundle", path, "--run-dir", run_dir, "--batch-size", 4])
    assert out["adapter"] == "reit-ml-100k-n8-k4-r8-s0-step1" and out["validation"] == fitted["best"]
    manifest = read_manifest(lorec_env / "registry", out["adapter"])
    assert (manifest.steps, manifest.stopped, manifest.device) == (1, "time", "cpu")
    assert manifest.n_train_prompts == 16 and manifest.split_sizes["train"] == 75599
    assert manifest.epochs == 0.25  # 1 step of 4 prompts out of 16

    # Handed a larger budget, the same run goes on from its checkpoint to the end of its epochs and
    # exports its final adapter as a new version; the budget-stopped one stays as it was.
    final = _invoke(app, ["train", "reit", "--bundle", path, "--run-dir", run_dir, "--batch-size", 4,
                          "--max-epochs", 2, "--eval-every", 3, "--patience", 10, "--max-seconds", 3600])
    state = json.loads((run_dir / "state.json").read_text())
    assert final["adapter"] == "reit-ml-100k-n8-k4-r8-s0"
    assert [e["step"] for e in state["evals"]] == [1, 3, 6, 8] and state["stopped"] is None
    # epochs behind the exported checkpoint: the best step's batches of 4 out of 16 prompts
    assert read_manifest(lorec_env / "registry", final["adapter"]).epochs == state["best"]["step"] * 4 / 16
    assert read_manifest(lorec_env / "registry", out["adapter"]).validation == fitted["best"]

    scored = lorec_env / "scores.json"
    _invoke(bundle.app, ["score", path, "--model", tiny_settings.model_dir, "--adapter",
                         lorec_env / "registry" / out["adapter"], "--out", scored])
    result = json.loads(scored.read_text())
    rows = bundle.load(path).parts["test"]
    assert result["keys"] == [[r.user_id, r.item_id, r.ts] for r in rows]
    assert result["auc"] == metrics([r.label for r in rows], result["scores"])["auc"]
    model = load_model(tiny_settings.model_dir, adapter_dir=lorec_env / "registry" / out["adapter"],
                       dtype=torch.float32)
    alone = score(model, [rows[0].input_ids], bundle.load(path).answer, bundle.load(path).pad_id)
    assert abs(alone[0] - result["scores"][0]) < 1e-4  # batched with padding = scored alone


@pytest.mark.parametrize("command", ["bundle-fit", "train-reit"])
def test_an_unknown_learning_rate_schedule_is_a_usage_error(command, tmp_path):
    """Both fit commands check --lr-schedule before loading anything, naming the option and its choices."""
    from typer.testing import CliRunner

    from service.cli import app

    bundle_file = tmp_path / "b.npz"
    bundle_file.write_bytes(b"")
    target, args = {"bundle-fit": (bundle.app, ["fit", bundle_file, "--model", tmp_path, "--run-dir", tmp_path / "r"]),
                    "train-reit": (app, ["train", "reit", "--bundle", bundle_file])}[command]
    result = CliRunner().invoke(target, [str(a) for a in [*args, "--lr-schedule", "exponential"]])
    assert result.exit_code == 2
    assert "--lr-schedule" in result.output and "cosine" in result.output
