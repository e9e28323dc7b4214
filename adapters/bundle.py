"""Prompt bundles: a run's token ids and labels, built where the item index lives, fitted and scored
where the accelerator is.

Building ReiT prompts needs the data and the gateway's item index (SUBR reads
Qdrant); fitting a LoRA and scoring a slice need only token ids, labels and the
model. A bundle (one compressed .npz) carries the prompts of the training pool,
the validation samples and, optionally, a seeded evaluation slice, with the
facts the adapter's manifest records. `lorec train prompts` writes one;
`python -m adapters.bundle fit|score` trains or scores it on a machine that
has torch, transformers and peft and nothing else of lorec (a GPU box);
`lorec train reit --bundle` trains from it or exports the finished run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import typer

from service.prompt import AnswerTokens

PARTS = ("train", "valid", "test")


class LrSchedule(StrEnum):
    """The learning rate after warmup: constant, or decaying to 0 at the last step (transformers' schedules). Both fit
    commands take it: `lorec train reit` and this module's `fit` (which runs without the rest of lorec)."""
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@dataclass(frozen=True, slots=True)
class BundledPrompt:
    user_id: str
    item_id: str
    ts: int
    mode: str
    label: int
    input_ids: list[int]


@dataclass
class Bundle:
    meta: dict  # dataset, data_fingerprint, split_sizes, n_train, k, seed, answer / pad ids, ...
    parts: dict[str, list[BundledPrompt]]

    @property
    def answer(self) -> AnswerTokens:
        return AnswerTokens(yes=self.meta["answer"]["yes"], no=self.meta["answer"]["no"])

    @property
    def pad_id(self) -> int:
        return self.meta["pad_id"]


def from_prompted(prompted: Sequence) -> list[BundledPrompt]:
    """PromptedSamples (adapters.samples) -> bundle rows."""
    return [BundledPrompt(p.sample.user_id, p.sample.item_id, p.sample.ts, p.mode, p.label, list(p.input_ids))
            for p in prompted]


def save(path: Path, bundle: Bundle) -> None:
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(bundle.meta))}
    for name, rows in bundle.parts.items():
        lengths = np.array([len(r.input_ids) for r in rows], dtype=np.int64)
        arrays[f"{name}_tokens"] = np.array([t for r in rows for t in r.input_ids], dtype=np.int32)
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[f"{name}_labels"] = np.array([r.label for r in rows], dtype=np.int8)
        arrays[f"{name}_ts"] = np.array([r.ts for r in rows], dtype=np.int64)
        for field in ("user_id", "item_id", "mode"):
            arrays[f"{name}_{field}"] = np.array([getattr(r, field) for r in rows], dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load(path: Path) -> Bundle:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        parts = {}
        for name in PARTS:
            if f"{name}_tokens" not in z:
                continue
            tokens, offsets = z[f"{name}_tokens"], z[f"{name}_offsets"]
            columns = [z[f"{name}_{f}"].tolist() for f in ("user_id", "item_id", "ts", "mode", "labels")]
            parts[name] = [BundledPrompt(u, i, int(t), m, int(y), tokens[offsets[j]:offsets[j + 1]].tolist())
                           for j, (u, i, t, m, y) in enumerate(zip(*columns, strict=True))]
    return Bundle(meta, parts)


app = typer.Typer(help="Fit or score a prompt bundle with torch + transformers + peft alone.",
                  no_args_is_help=True)


@app.command("fit")
def fit_command(
    bundle_path: Path = typer.Argument(..., exists=True, dir_okay=False),
    model: Path = typer.Option(..., exists=True, file_okay=False, help="the served model's folder"),
    run_dir: Path = typer.Option(..., help="checkpoints; re-running resumes"),
    rank: int = typer.Option(8), alpha: int = typer.Option(16), target_modules: str = typer.Option("q_proj,v_proj"),
    lr: float = typer.Option(1e-3), batch_size: int = typer.Option(8), max_epochs: int = typer.Option(2),
    eval_every: int = typer.Option(64, min=1), patience: int = typer.Option(3, min=1), seed: int = typer.Option(0),
    lr_schedule: LrSchedule = typer.Option(LrSchedule.constant, help="learning rate after warmup"),
    warmup_steps: int = typer.Option(0, min=0),
    loss: str = typer.Option("vocab"), device: str = typer.Option("cpu"),
    max_seconds: float = typer.Option(None, help="time budget; the best checkpoint so far is kept"),
) -> None:
    """Train a LoRA on the bundle's train part, choosing the checkpoint on its valid part."""
    from adapters.train import LoraSettings, TrainSettings, train_lora

    bundle = load(bundle_path)
    settings = TrainSettings(lora=LoraSettings(rank=rank, alpha=alpha, target_modules=tuple(target_modules.split(","))),
                             lr=lr, lr_schedule=lr_schedule.value, warmup_steps=warmup_steps, batch_size=batch_size,
                             max_epochs=max_epochs, eval_every=eval_every, patience=patience, seed=seed,
                             loss=loss, device=device, max_seconds=max_seconds)
    state = train_lora(model, bundle.parts["train"], bundle.parts["valid"], bundle.answer, bundle.pad_id, run_dir,
                       settings)
    typer.echo(json.dumps({"run_dir": str(run_dir), "best": state["best"], "steps": state["step"],
                           "seconds": round(state["seconds"], 1), "stopped": state.get("stopped")}))


@app.command("score")
def score_command(
    bundle_path: Path = typer.Argument(..., exists=True, dir_okay=False),
    model: Path = typer.Option(..., exists=True, file_okay=False),
    adapter: Path = typer.Option(None, exists=True, file_okay=False, help="PEFT adapter folder; none: the base"),
    part: str = typer.Option("test"), device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32", help="the engine's dtype, for scores that agree with the served ones"),
    out: Path = typer.Option(..., help="JSON: metrics, and the scores in the part's order"),
) -> None:
    """P(Yes) for every prompt of one part, and its AUC / LogLoss / ACC."""
    import time

    import torch

    from adapters.train import load_model, metrics, score

    bundle = load(bundle_path)
    rows = bundle.parts[part]
    started = time.monotonic()
    net = load_model(model, adapter_dir=adapter, dtype=getattr(torch, dtype), device=device)
    scores = score(net, [r.input_ids for r in rows], bundle.answer, bundle.pad_id, batch_size=64, progress=part)
    result = {**metrics([r.label for r in rows], scores), "part": part, "dtype": dtype, "device": device,
              "adapter": str(adapter) if adapter else "base", "seconds": round(time.monotonic() - started, 1),
              "keys": [[r.user_id, r.item_id, r.ts] for r in rows], "scores": scores}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    typer.echo(json.dumps({k: v for k, v in result.items() if k not in ("keys", "scores")}))


if __name__ == "__main__":
    app()
