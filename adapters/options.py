"""The trainer's command-line options, declared once.

`lorec train reit`, `lorec train reclora` and `python -m adapters.bundle fit` (which runs with torch,
transformers and peft alone) take the same training options, with the defaults of `TrainSettings`, and
turn them into one `TrainSettings` the same way (`train_settings`).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from adapters.train import LoraSettings, TrainSettings

DEFAULTS = TrainSettings()
DEFAULT_TARGETS = ",".join(DEFAULTS.lora.target_modules)


class LrSchedule(StrEnum):
    """The learning rate after warmup: constant, or decaying to 0 at the last step (transformers' schedules)."""
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class Loss(StrEnum):
    vocab = "vocab"  # LM cross-entropy on the answer token
    pair = "pair"  # logistic loss on logit Yes - logit No
    residual = "residual"  # pair with the CRM's logit (LOREC_CRM) added: the adapter learns what the CRM misses


class PromptKind(StrEnum):
    rella = "rella"  # ReLLa's shape, as published
    crm_estimate = "crm-estimate"  # plus the CRM's (LOREC_CRM) estimate for the target


Directory = Annotated[Path, typer.Option("--dir", exists=True, file_okay=False, help="MovieLens folder")]
NTrain = Annotated[int, typer.Option("--n", help="few-shot samples drawn from train (each seen twice: ReiT)")]
NValid = Annotated[int, typer.Option(help="validation samples for checkpoint choice and early stopping")]
K = Annotated[int, typer.Option(help="behaviours per prompt")]
Rank = Annotated[int, typer.Option(help="LoRA rank")]
Alpha = Annotated[int, typer.Option(help="LoRA alpha")]
Targets = Annotated[str, typer.Option("--target-modules", help="comma-separated module names the LoRA adapts")]
Lr = Annotated[float, typer.Option(help="peak learning rate (AdamW)")]
BatchSize = Annotated[int, typer.Option(help="prompts per optimizer step")]
MaxEpochs = Annotated[int, typer.Option(help="passes over the training prompts at most")]
Schedule = Annotated[LrSchedule, typer.Option(help="learning rate after warmup")]
Warmup = Annotated[int, typer.Option(min=0, help="steps of linear warmup")]
EvalEvery = Annotated[int, typer.Option(min=1, help="optimizer steps between validation evaluations")]
Patience = Annotated[int, typer.Option(min=1, help="scheduled evaluations without a better validation AUC "
                                              "before the run stops")]
Seed = Annotated[int, typer.Option(help="seed of the few-shot draw and of training")]
LossOption = Annotated[Loss, typer.Option(help="vocab, pair, or residual (needs LOREC_CRM)")]
Device = Annotated[str, typer.Option(help="torch device to train on (cpu, cuda)")]
MaxSeconds = Annotated[float | None, typer.Option(help="time budget; the best checkpoint so far is kept")]


def train_settings(rank: int, alpha: int, target_modules: str, lr: float, batch_size: int, max_epochs: int,
                   lr_schedule: LrSchedule, warmup_steps: int, eval_every: int, patience: int, seed: int,
                   loss: Loss = Loss.vocab, device: str = "cpu", max_seconds: float | None = None) -> TrainSettings:
    return TrainSettings(lora=LoraSettings(rank=rank, alpha=alpha, target_modules=tuple(target_modules.split(","))),
                         lr=lr, lr_schedule=lr_schedule.value, warmup_steps=warmup_steps, batch_size=batch_size,
                         max_epochs=max_epochs, eval_every=eval_every, patience=patience, seed=seed, loss=loss.value,
                         device=device, max_seconds=max_seconds)
