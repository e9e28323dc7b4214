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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch
import typer

from adapters import options as o
from adapters.train import load_model, metrics, score, train_lora
from service.prompt import AnswerTokens

D = o.DEFAULTS

PARTS = ("train", "valid", "test")


@dataclass(frozen=True, slots=True)
class BundledPrompt:
    user_id: str
    item_id: str
    ts: int
    mode: str
    label: int
    input_ids: list[int]


class UnknownBundleFormat(ValueError):
    """A bundle written by another format (version) of `lorec train prompts`."""


@dataclass(frozen=True)
class BundleMeta:
    """What a bundle says of its prompts (the facts an adapter's manifest records), round-tripped as JSON."""

    FORMAT: ClassVar[str] = "lorec.bundle"
    VERSION: ClassVar[int] = 1

    dataset: str
    data_fingerprint: str
    split_sizes: dict[str, int]
    n_train: int
    k: int
    seed: int
    retrieval: str
    test_seed: int
    model: str  # the served model's folder name the token ids are for
    answer: dict[str, int]  # {"yes": id, "no": id}
    pad_id: int

    def to_json(self) -> str:
        return json.dumps({"format": self.FORMAT, "format_version": self.VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str, where: Path) -> BundleMeta:
        raw = json.loads(text)
        found = (raw.pop("format", cls.FORMAT), raw.pop("format_version", cls.VERSION))  # unversioned: version 1
        if found != (cls.FORMAT, cls.VERSION) or set(raw) != {f.name for f in fields(cls)}:
            raise UnknownBundleFormat(f"{where}: a {found[0]!r} version {found[1]!r} bundle with fields "
                                      f"{sorted(raw)}; this lorec reads {cls.FORMAT!r} version {cls.VERSION}: "
                                      "write it again with `lorec train prompts`")
        return cls(**raw)

    def facts(self) -> dict:
        """The facts an adapter's manifest takes from its training data (offline.Dataset.facts's keys)."""
        return {"dataset": self.dataset, "data_fingerprint": self.data_fingerprint, "split_sizes": self.split_sizes,
                "n_train": self.n_train, "k": self.k}


@dataclass
class Bundle:
    meta: BundleMeta
    parts: dict[str, list[BundledPrompt]]

    @property
    def answer(self) -> AnswerTokens:
        return AnswerTokens(yes=self.meta.answer["yes"], no=self.meta.answer["no"])

    @property
    def pad_id(self) -> int:
        return self.meta.pad_id


def from_prompted(prompted: Sequence) -> list[BundledPrompt]:
    """PromptedSamples (adapters.samples) -> bundle rows."""
    return [BundledPrompt(p.sample.user_id, p.sample.item_id, p.sample.ts, p.mode, p.label, list(p.input_ids))
            for p in prompted]


def save(path: Path, bundle: Bundle) -> None:
    arrays: dict[str, np.ndarray] = {"meta": np.array(bundle.meta.to_json())}
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
        meta = BundleMeta.from_json(str(z["meta"]), path)
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
    bundle_path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="the served model's folder")],
    run_dir: Annotated[Path, typer.Option(help="checkpoints; re-running resumes")],
    rank: o.Rank = D.lora.rank, alpha: o.Alpha = D.lora.alpha, target_modules: o.Targets = o.DEFAULT_TARGETS,
    lr: o.Lr = D.lr, batch_size: o.BatchSize = D.batch_size, max_epochs: o.MaxEpochs = D.max_epochs,
    lr_schedule: o.Schedule = o.LrSchedule.constant, warmup_steps: o.Warmup = D.warmup_steps,
    eval_every: o.EvalEvery = D.eval_every, patience: o.Patience = D.patience, seed: o.Seed = D.seed,
    loss: o.LossOption = o.Loss.vocab, device: o.Device = D.device, max_seconds: o.MaxSeconds = None,
) -> None:
    """Train a LoRA on the bundle's train part, choosing the checkpoint on its valid part."""
    if loss == o.Loss.residual:
        raise typer.BadParameter("a bundle carries no CRM offsets", param_hint="--loss")
    bundle = load(bundle_path)
    settings = o.train_settings(rank, alpha, target_modules, lr, batch_size, max_epochs, lr_schedule, warmup_steps,
                                eval_every, patience, seed, loss, device, max_seconds)
    state = train_lora(model, bundle.parts["train"], bundle.parts["valid"], bundle.answer, bundle.pad_id, run_dir,
                       settings)
    typer.echo(json.dumps({"run_dir": str(run_dir), "best": state.best, "steps": state.step,
                           "seconds": round(state.seconds, 1), "stopped": state.stopped}))


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
