"""`lorec train reclora`: a RecLoRA bank trained on the few-shot prompts, saved with its k-means cohorts.

The gate reads the feature CRM's user side (LOREC_CRM) when one is configured, else the DIN's user vector
(`lorec train crm`); the bank records which, and the gateway gates on the same (personalize.bank_gate).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from adapters.offline import few_shot_prompts
from adapters.reclora import BankSettings, cohort_centroids, gate_vectors, load_reclora, save_cohorts, train_reclora
from adapters.reit import targets_tag
from adapters.train import TrainSettings
from service.config import Settings


@dataclass
class BankJob:
    directory: Path
    bank: BankSettings
    training: TrainSettings
    n_train: int = 1024
    n_valid: int = 1000
    k: int = 10
    cohorts: tuple[int, ...] = (8, 32, 128)
    name: str | None = None


def train_bank(settings: Settings, job: BankJob) -> dict:
    shots = asyncio.run(few_shot_prompts(settings, job.directory, job.n_train, job.n_valid, job.k,
                                         job.training.seed))
    dataset, data = shots.dataset, shots.dataset.data
    crm_ref = settings.scoring.crm or f"{dataset.name}-din.pt"
    if not settings.scoring.crm and not settings.paths.crm(crm_ref).exists():
        raise ValueError(f"no CRM: set LOREC_CRM (lorec train gbdt) or run `lorec train crm` for "
                         f"{settings.paths.crm(crm_ref)}")
    users = gate_vectors(settings.data_dir, crm_ref, [p.sample for p in [*shots.train, *shots.valid]], data)
    gate_tag = "" if crm_ref.endswith(".pt") else "-gbdt"
    b = job.bank
    name = job.name or (f"reclora-{dataset.name}-n{job.n_train}-m{b.n_meta}-r{b.rank}-s{job.training.seed}"
                        + targets_tag(",".join(b.target_modules)) + gate_tag)
    run_dir = settings.paths.run(name)
    state = train_reclora(settings.model_dir, shots.train, shots.valid, users, shots.codec.answer,
                          shots.codec.pad_id, run_dir, job.training, b)
    model = load_reclora(settings.model_dir, bank_dir=run_dir / "best")
    out = settings.paths.bank(name)
    model.save(out, {"base_model": str(settings.model_dir), "crm": crm_ref, "dataset": dataset.name,
                     "n_train_samples": job.n_train, "validation": state.best, "train_seconds": state.seconds,
                     "epochs": state.epochs()})
    # Cohorts over every train user's vector at their last train sample.
    last = {s.user_id: s for s in dataset.parts["train"]}
    train_users = gate_vectors(settings.data_dir, crm_ref, list(last.values()), data)
    save_cohorts(out, {c: cohort_centroids(model, train_users, c, job.training.seed) for c in job.cohorts})
    return {"bank": name, "path": str(out), "validation": state.best, "cohorts": list(job.cohorts),
            "train_seconds": state.seconds}
