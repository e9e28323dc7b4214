"""LoRA training (ReiT) with peft + transformers on the served model, in bf16 where the hardware runs it
fast (a GPU, an AVX-512 CPU) and fp32 elsewhere (`training_dtype`; CPU by default, a GPU when told:
`TrainSettings.device`).

Only the answer matters: prompts are left-padded so the answer position is
the last one for every row, the model computes logits there alone
(`logits_to_keep=1`), and the loss is cross-entropy on the answer token
(" Yes" for label 1, " No" for 0). Scores are the same two-way softmax the
gateway computes from vLLM. Validation AUC picks the checkpoint and stops
training early; the test split is not touched here. A run directory holds
the latest state (adapter, optimizer, step, best metrics), so an interrupted
run resumes where it stopped.

A plain loop rather than `transformers.Trainer`: the Trainer computes
full-sequence logits in its loss and evaluation, the thing this trainer is
built to avoid, and its evaluation would need overriding anyway.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from tqdm import tqdm

from adapters.runs import Run, RunState
from service.prompt import AnswerTokens

Prepare = Callable[[torch.nn.Module, Sequence[int]], None]  # (model, batch row indices) before a forward


class Prompt(Protocol):
    """What training reads of a prompt: its token ids and its label (a PromptedSample, a bundled prompt)."""
    input_ids: Sequence[int]
    label: int


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class TrainSettings:
    lora: LoraSettings = field(default_factory=LoraSettings)
    lr: float = 1e-3
    # constant, linear or cosine decay to 0 at the last step (transformers' schedules), after warmup_steps
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 8
    max_epochs: int = 2
    eval_every: int = 64  # optimizer steps
    patience: int = 3  # evaluations without a better validation AUC
    seed: int = 0
    threads: int | None = None
    loss: str = "vocab"  # vocab: cross-entropy over the vocabulary; pair: logistic loss on logit(Yes) - logit(No);
    # residual: pair loss with each prompt's offset (the CRM's logit) added
    device: str = "cpu"
    max_seconds: float | None = None  # time budget: once past it, evaluate and stop (best checkpoint kept)
    dtype: str = "auto"  # the base model's dtype while training: auto = training_dtype(device)


def training_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """bf16 on a GPU or a CPU whose torch build runs AVX-512 kernels (bf16 matmuls there are fast), else
    fp32: on an AVX2-only CPU torch's bf16 matmul falls back to a scalar loop, ~50x slower than fp32
    for the backward pass's transposed products (measured: 3.8 s vs 0.08 s for 2240x2048 @ 2048x640)."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else torch.float32


def metrics(labels: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
    labels, scores = np.asarray(labels), np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) > 1 else float("nan")
    return {"auc": auc, "logloss": float(log_loss(labels, scores, labels=[0, 1])),
            "acc": float(accuracy_score(labels, scores > 0.5)), "n": int(len(labels))}


def load_model(model_dir: Path, lora: LoraSettings | None = None, adapter_dir: Path | None = None,
               dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """The base model (bf16 unless told), with a fresh LoRA (`lora`), a saved one (`adapter_dir`), or none."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=lora is not None)
    if lora is not None:
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        return get_peft_model(model, config)
    return model


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def answer_logits(model, rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Logits at the answer position only: shape (batch, vocab).

    The decoder runs without its head; the last position's hidden state is cut
    to a 2-D (batch, hidden) matrix before the output projection. Passing the
    (batch, 1, hidden) slice the model's own `logits_to_keep=1` keeps made the
    bf16 backward copy the tied 262k x 640 embedding once per row (9 s a step).
    """
    device = model.get_output_embeddings().weight.device
    ids, mask = (t.to(device) for t in _left_pad(rows, pad_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
    decoder = model.get_base_model().get_decoder() if hasattr(model, "get_base_model") else model.get_decoder()
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, -1, :])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


@torch.inference_mode()
def score(model, rows: Sequence[Sequence[int]], answer: AnswerTokens, pad_id: int, batch_size: int = 16,
          progress: str | None = None, prepare: Prepare | None = None) -> list[float]:
    """P(Yes) = softmax over the two answer tokens, as the gateway computes it."""
    model.eval()
    out: list[float] = []
    for start in tqdm(range(0, len(rows), batch_size), desc=progress, disable=progress is None, unit="batch"):
        if prepare is not None:
            prepare(model, range(start, min(start + batch_size, len(rows))))
        logits = answer_logits(model, rows[start:start + batch_size], pad_id)
        two = torch.log_softmax(logits, -1)[:, [answer.yes, answer.no]]
        out += torch.softmax(two, -1)[:, 0].cpu().tolist()
    return out


def train_lora(model_dir: Path, train: Sequence[Prompt], valid: Sequence[Prompt],
               answer: AnswerTokens, pad_id: int, run_dir: Path, settings: TrainSettings) -> RunState:
    """Train (or resume) one LoRA adapter; returns the final state with the best validation metrics."""
    def load(resume: Path | None):
        return load_model(model_dir, settings.lora, adapter_dir=resume, device=settings.device,
                          dtype=training_dtype(settings.device, settings.dtype))

    return fit(load, train, valid, answer, pad_id, run_dir, settings)


def fit(load: Callable[[Path | None], torch.nn.Module], train: Sequence[Prompt],
        valid: Sequence[Prompt], answer: AnswerTokens, pad_id: int, run_dir: Path,
        settings: TrainSettings, prepare: Prepare | None = None) -> dict:
    """The training loop: `load(resume_dir or None)` gives the model (trainable parameters marked),
    `prepare(model, rows)` is called before each forward with the batch's row indices (train rows
    as indices into `train`; validation rows offset by len(train))."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    run = Run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = run.state() or RunState(settings=json.loads(json.dumps(asdict(settings))), n_train=len(train),
                                    n_valid=len(valid))
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total = steps_per_epoch * settings.max_epochs
    if state.done and _given_more_time(state, settings, total):
        state.done, state.stopped = False, None  # a run stopped by its budget goes on under a larger one
        state.settings["max_seconds"] = settings.max_seconds
    if state.done:
        return state
    resume = run_dir / "latest" if state.step else None
    model = load(resume)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    scheduler = learning_rate_schedule(optimizer, settings, total)
    if resume is not None:
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt"))
        if (resume / "scheduler.pt").exists():  # runs checkpointed before schedules were kept: constant
            scheduler.load_state_dict(torch.load(resume / "scheduler.pt"))

    valid_rows, valid_labels = [p.input_ids for p in valid], [p.label for p in valid]
    valid_prepare = None if prepare is None else (lambda m, rows: prepare(m, [len(train) + r for r in rows]))
    progress = tqdm(total=total, initial=state.step, desc="train", unit="step")
    started = time.monotonic() - state.seconds
    while state.step < total and not state.done:
        epoch, offset = divmod(state.step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(settings.seed + epoch).shuffle(order)  # same order on resume
        rows = order[offset * settings.batch_size:(offset + 1) * settings.batch_size]
        batch = [train[i] for i in rows]
        model.train()
        if prepare is not None:
            prepare(model, rows)
        logits = answer_logits(model, [p.input_ids for p in batch], pad_id)
        loss = answer_loss(logits, [p.label for p in batch], answer, settings.loss, _offsets(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        state.step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}", best_auc=_fmt(state.best))
        out_of_time = settings.max_seconds is not None and time.monotonic() - started >= settings.max_seconds
        if _scheduled(state.step, settings.eval_every, total) or out_of_time:
            scores = score(model, valid_rows, answer, pad_id, prepare=valid_prepare)
            result = metrics(valid_labels, with_offsets(scores, _offsets(valid)) if settings.loss == "residual"
                             else scores)
            improved = state.best is None or result["auc"] > state.best["auc"]
            state.evals.append({"step": state.step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                                   **result})
            state.best = {"step": state.step, **result} if improved else state.best
            state.stale = _stale_evaluations(state, settings.eval_every, total)
            state.seconds = time.monotonic() - started
            state.stopped = "patience" if state.stale >= settings.patience else "time" if out_of_time else None
            state.done = state.stopped is not None or state.step == total
            run.save(model, optimizer, scheduler, state, best=improved)
            progress.set_postfix(loss=f"{loss.item():.4f}", val_auc=f"{result['auc']:.4f}",
                                 best_auc=_fmt(state.best))
    progress.close()
    return state


def learning_rate_schedule(optimizer, settings: TrainSettings, total_steps: int):
    """The learning rate per step, stepped with the optimizer and checkpointed with it (resumable)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if settings.lr_schedule == "constant" else settings.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=total_steps)


def _stale_evaluations(state: RunState, eval_every: int, total: int) -> int:
    """Scheduled evaluations since the best one: what patience counts. An evaluation forced by the time
    budget may pick the checkpoint but does not count, so a run stopped and resumed is not stopped
    earlier than an unbroken one; derived from the record, a resumed run's count is right again."""
    best = state.best["step"]
    return sum(1 for e in state.evals if e["step"] > best and _scheduled(e["step"], eval_every, total))


def _scheduled(step: int, eval_every: int, total: int) -> bool:
    """Validation runs every `eval_every` steps and at the last one."""
    return step % eval_every == 0 or step == total


def _given_more_time(state: RunState, settings: TrainSettings, total: int) -> bool:
    """A run that stopped on its time budget resumes only when handed a larger one explicitly: re-running
    it without a budget exports what it has (e.g. a run fitted on a GPU box under a budget)."""
    return (state.stopped == "time" and state.step < total and settings.max_seconds is not None
            and settings.max_seconds > state.seconds)


def answer_loss(logits: torch.Tensor, labels: Sequence[int], answer: AnswerTokens, kind: str,
                offsets: Sequence[float] | None = None) -> torch.Tensor:
    """Loss on the answer token only. `vocab`: the language-model loss (cross-entropy of " Yes" for
    label 1, " No" for 0 over the whole vocabulary). `pair`: the logistic loss of the score itself,
    sigmoid(logit Yes - logit No), which is what the gateway's two-way softmax reads. `residual`: the
    same with each prompt's `offset` (the CRM's logit) added, so the adapter learns what the CRM misses
    (boosting with the CRM as the prior; the served score is the combination, combine.py)."""
    y = torch.tensor(labels, dtype=torch.float32, device=logits.device)
    if kind in ("pair", "residual"):
        margin = logits[:, answer.yes] - logits[:, answer.no]
        if kind == "residual":
            margin = margin + torch.tensor(offsets, dtype=torch.float32, device=logits.device)
        return torch.nn.functional.binary_cross_entropy_with_logits(margin, y)
    if kind != "vocab":
        raise ValueError(f"unknown loss {kind!r}")
    targets = torch.where(y > 0, answer.yes, answer.no).long()
    return torch.nn.functional.cross_entropy(logits, targets)


def _offsets(prompts: Sequence[Prompt]) -> list[float]:
    return [getattr(p, "offset", 0.0) for p in prompts]


def with_offsets(scores: Sequence[float], offsets: Sequence[float]) -> list[float]:
    """P(Yes) of the LLM moved by each prompt's offset in logit space: sigmoid(logit(p) + offset)."""
    out = []
    for p, offset in zip(scores, offsets):
        p = min(max(p, 1e-7), 1 - 1e-7)
        out.append(1 / (1 + math.exp(-(math.log(p / (1 - p)) + offset))))
    return out


def _fmt(best: dict | None) -> str:
    return "-" if best is None else f"{best['auc']:.4f}"
