"""ReiT LoRA training on the tiny model: resumable, exported to the registry, served by vLLM with the
same scores transformers + peft compute offline."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, replace

import numpy as np
import pytest

from adapters.export import export_adapter, read_manifest
from adapters.runs import RunState
from adapters.samples import build_samples, draw, reit_prompts, split_by_time
from adapters.train import LoraSettings, TrainSettings, load_model, score, train_lora
from service.ingest import read_movielens
from service.prompt import load_codec
from tests.utils.stack import ML100K


def test_train_resume_export_and_serve(gateway, tiny_settings, tmp_path):
    data = read_movielens(ML100K)
    parts = split_by_time(build_samples(data))
    codec = load_codec(tiny_settings.model_dir)
    index = gateway.app.state.recommender.index
    train = asyncio.run(reit_prompts(draw(parts["train"], 24, 0), data, index, codec, k=5))
    valid = asyncio.run(reit_prompts(draw(parts["valid"], 24, 1), data, index, codec, k=5, modes=("subr",)))
    assert len(train) == 48 and len(valid) == 24

    settings = TrainSettings(lora=LoraSettings(rank=4, alpha=8), lr=5e-3, batch_size=8, max_epochs=2,
                             eval_every=3, patience=10)
    run_dir = tmp_path / "run"
    pad = codec.tokenizer.pad_token_id
    state = train_lora(tiny_settings.model_dir, train, valid, codec.answer, pad, run_dir, settings)
    assert state.done and state.step == 12 and len(state.evals) == 4
    assert state.best["auc"] == max(e["auc"] for e in state.evals)
    assert json.loads((run_dir / "state.json").read_text())["step"] == 12
    # A finished run resumes to its end without training again.
    assert train_lora(tiny_settings.model_dir, train, valid, codec.answer, pad, run_dir, settings) == state

    name = "reit-test-v1"
    export_adapter(run_dir / "best", tiny_settings.registry_dir, name, tiny_settings.model_dir,
                   {"method": "reit", "validation": state.best})
    assert read_manifest(tiny_settings.registry_dir, name).validation == state.best

    # Served through the gateway and vLLM ...
    sample = valid[0].sample
    request = {"user_id": sample.user_id, "item_ids": [sample.item_id], "as_of": sample.ts,
               "options": {"k": 5, "retrieval": "subr", "return_prompt": True}}
    base = gateway.post("/v1/ctr", json=request).json()["scores"][0]
    served = gateway.post("/v1/ctr", json={**request, "options": {**request["options"], "adapter": name}}).json()
    served = served["scores"][0]
    assert served["prompt_token_ids"] == valid[0].input_ids
    assert abs(served["score"] - base["score"]) > 1e-4, "the adapter does not change the score"
    # ... equals the same adapter in transformers + peft.
    model = load_model(tiny_settings.model_dir, adapter_dir=tiny_settings.registry_dir / name)
    offline = score(model, [valid[0].input_ids], codec.answer, pad)[0]
    assert abs(offline - served["score"]) < 0.01, (offline, served["score"])
    assert np.isfinite(offline)


def test_train_reit_command_exports_a_listed_adapter(gateway, tiny_settings, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from service.cli import app

    for key, value in {"LOREC_DATA_DIR": tiny_settings.data_dir, "LOREC_MODEL": tiny_settings.model,
                       "LOREC_REDIS_URL": tiny_settings.redis.url, "LOREC_ADAPTER_DIR": tmp_path / "registry"}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("QDRANT_URL", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "reit", "--dir", str(ML100K), "--n", "8", "--n-valid", "16", "--k", "4",
                                 "--max-epochs", "1", "--eval-every", "1", "--batch-size", "4",
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["adapter"] == "reit-ml-100k-n8-k4-r8-s0"
    manifest = read_manifest(tmp_path / "registry", out["adapter"])
    assert manifest.n_train_prompts == 16 and manifest.split_sizes["train"] == 75599
    assert manifest.lora["target_modules"] == ["q_proj", "v_proj"]
    assert manifest.lr == {"peak": 1e-3, "schedule": "constant", "warmup_steps": 0}
    listed = runner.invoke(app, ["adapters", "list"])
    assert listed.exit_code == 0 and out["adapter"] in listed.output


def test_answer_logits_equal_the_models_last_position_logits(tiny_settings):
    """The trainer's head-at-the-answer-only path computes the same logits as the full model, with
    rows of different lengths left-padded."""
    import torch

    from adapters.train import answer_logits

    model = load_model(tiny_settings.model_dir, lora=LoraSettings(rank=4, alpha=8)).eval()
    rows = [[1, 5, 9, 13, 17, 21], [1, 7, 11], [1, 30, 31, 32, 33]]
    with torch.inference_mode():
        fast = answer_logits(model, rows, pad_id=0)
        for row, got in zip(rows, fast):
            full = model(input_ids=torch.tensor([row])).logits[0, -1].float()
            torch.testing.assert_close(got, full, atol=0.05, rtol=0.02)


def test_answer_losses_prefer_the_right_answer():
    """Both losses are lower when the logits favour the labelled answer."""
    import torch

    from adapters.train import answer_loss
    from service.prompt import AnswerTokens

    answer = AnswerTokens(yes=3, no=5)
    right = torch.zeros(2, 8)
    right[0, 3], right[1, 5] = 4.0, 4.0  # row 0 says Yes (label 1), row 1 says No (label 0)
    wrong = right.flip(0)
    for kind in ("vocab", "pair"):
        assert answer_loss(right, [1, 0], answer, kind) < answer_loss(wrong, [1, 0], answer, kind)


def test_run_names_keep_variants_apart():
    """A variant of the recipe (loss, rank, target modules) never resumes or overwrites the default run."""
    from adapters.options import DEFAULT_TARGETS
    from adapters.reit import reit_run_name

    default = reit_run_name("ml-1m-u2999", 256, 10, 8, 0, "vocab", DEFAULT_TARGETS)
    assert default == "reit-ml-1m-u2999-n256-k10-r8-s0"
    variants = {reit_run_name("ml-1m-u2999", 256, 10, 8, 0, "pair", DEFAULT_TARGETS),
                reit_run_name("ml-1m-u2999", 256, 10, 32, 0, "vocab", DEFAULT_TARGETS),
                reit_run_name("ml-1m-u2999", 256, 10, 8, 0, "vocab", "q_proj,k_proj,v_proj,o_proj")}
    assert len(variants) == 3 and default not in variants
    assert "reit-ml-1m-u2999-n256-k10-r8-s0-q.k.v.o" in variants
    assert reit_run_name("ml-1m-u2999", 256, 10, 8, 0, "vocab", DEFAULT_TARGETS, "cosine", 32) \
        == "reit-ml-1m-u2999-n256-k10-r8-s0-cosine-w32"


@dataclass
class _Prompt:
    input_ids: list[int]
    label: int


def test_a_decaying_learning_rate_resumes_where_it_stopped(tiny_model, tmp_path):
    """A linear schedule decays to 0 at the last step, and a run cut by its time budget goes on along the
    same schedule (the scheduler is checkpointed with the optimizer)."""
    codec = load_codec(tiny_model)
    rng = random.Random(0)
    prompts = [_Prompt([rng.randrange(10, len(codec.tokenizer)) for _ in range(12)], i % 2) for i in range(16)]
    settings = TrainSettings(lora=LoraSettings(rank=4, alpha=8), lr=1e-2, lr_schedule="linear", batch_size=4,
                             max_epochs=2, eval_every=2, patience=99)

    def fit(run: str, s: TrainSettings) -> RunState:
        return train_lora(tiny_model, prompts, prompts[:8], codec.answer, codec.tokenizer.pad_token_id,
                          tmp_path / run, s)

    def linear(steps: list[int]):  # 8 steps in all
        return pytest.approx([1e-2 * (1 - s / 8) for s in steps])

    whole = fit("whole", settings)
    assert [e["lr"] for e in whole.evals] == linear([2, 4, 6, 8])
    cut = fit("cut", replace(settings, max_seconds=0))
    assert cut.stopped == "time" and cut.step == 1
    resumed = fit("cut", replace(settings, max_seconds=3600))
    assert resumed.step == 8 and [e["lr"] for e in resumed.evals] == linear([1, 2, 4, 6, 8])


def test_patience_counts_scheduled_evaluations_only():
    """The evaluation a time budget forces (step 129 here) is on record, may be the best, but is not one of
    the evaluations patience counts, so resuming does not stop the run earlier than an unbroken one."""
    from adapters.train import _stale_evaluations

    def record(best_step: int, *steps: int) -> RunState:
        return RunState(settings={}, n_train=8, n_valid=8, best={"step": best_step}, evals=[{"step": s} for s in steps])

    assert _stale_evaluations(record(128, 64, 128, 129, 192), eval_every=64, total=1024) == 1
    assert _stale_evaluations(record(128, 64, 128, 129, 192, 256), eval_every=64, total=1024) == 2
    assert _stale_evaluations(record(129, 64, 128, 129, 192), eval_every=64, total=1024) == 1
    assert _stale_evaluations(record(64, 64, 100), eval_every=64, total=100) == 1  # the last step is scheduled
