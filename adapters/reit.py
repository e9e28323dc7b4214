"""`lorec train reit`: a ReiT LoRA adapter trained (or resumed) and exported into the registry.

Prompts come from a MovieLens folder (built offline with the gateway's own retrieval and template) or
from a prompt bundle. With the residual loss each prompt carries its sample's CRM logit as an offset:
out-of-fold for the train samples (the CRM saw them), the CRM's own for the validation samples. With
`--prompt crm-estimate` the prompts show the same logits as the CRM's estimate (service.prompt), and the
adapter's manifest names that CRM (`prompt_crm`): the gateway writes its prompts only with that CRM.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters import bundle
from adapters.export import export_adapter, read_manifest
from adapters.features import OfflineFeatures
from adapters.gbdt import out_of_fold_logits
from adapters.offline import CrmLogits, CrmLogitsOf, Dataset, few_shot_prompts
from adapters.options import DEFAULT_TARGETS, Loss, PromptKind
from adapters.records import recorded_command
from adapters.samples import Sample
from adapters.train import TrainSettings, train_lora, training_dtype
from service.config import Settings
from service.crm import Crm, crm_dir


def reit_run_name(dataset: str, n_train: int, k: int, rank: int, seed: int, loss: str, target_modules: str,
                  lr_schedule: str = "constant", warmup_steps: int = 0) -> str:
    """A ReiT run's name: what sets it apart from the default recipe is in it, so a variant is its own run."""
    name = f"reit-{dataset}-n{n_train}-k{k}-r{rank}-s{seed}" + ("" if loss == "vocab" else f"-{loss}")
    schedule = ("" if lr_schedule == "constant" else f"-{lr_schedule}") + (f"-w{warmup_steps}" if warmup_steps else "")
    return name + targets_tag(target_modules) + schedule


def targets_tag(target_modules: str) -> str:
    """'' for the default target modules, else e.g. '-q.k.v.o.gate.up.down' (ReiT runs and RecLoRA banks)."""
    if target_modules == DEFAULT_TARGETS:
        return ""
    return "-" + ".".join(m.removesuffix("_proj") for m in target_modules.split(","))


def crm_logits_of(settings: Settings) -> CrmLogitsOf:
    """The configured CRM's (LOREC_CRM) logits on a few-shot draw, for residual training or the estimate in the
    prompt: out-of-fold on the train samples (refitted without them), its own on the validation samples."""
    if not settings.scoring.crm:
        raise ValueError("residual training and --prompt crm-estimate need the CRM: set LOREC_CRM")
    crm = Crm(crm_dir(settings.data_dir, settings.scoring.crm))

    def logits(dataset: Dataset, train: list[Sample], valid: list[Sample]) -> CrmLogits:
        features = OfflineFeatures(dataset.data, crm.spec)
        pool = dataset.parts["train"]
        position = {(s.user_id, s.item_id, s.ts): i for i, s in enumerate(pool)}
        wanted = [position[(s.user_id, s.item_id, s.ts)] for s in train]
        rows = sorted(set(wanted))
        oof = out_of_fold_logits(crm.manifest.params, crm.spec.names, features.matrix(pool, "train features"),
                                 np.array([s.label for s in pool]), rows)
        by_row = dict(zip(rows, oof))
        return CrmLogits(crm.ref, [float(by_row[r]) for r in wanted],
                         [float(x) for x in crm.logits(features.matrix(valid))])

    return logits


@dataclass
class ReitJob:
    training: TrainSettings
    directory: Path | None = None
    bundle_path: Path | None = None
    n_train: int = 1024
    n_valid: int = 1000
    k: int = 10
    name: str | None = None
    run_dir: Path | None = None
    prompt: PromptKind = PromptKind.rella


def _prompts(settings: Settings, job: ReitJob) -> tuple[dict, list, list, object, int]:
    """(facts, train, valid, answer tokens, pad id) from the folder or the bundle."""
    if job.bundle_path is not None:
        if job.training.loss == Loss.residual or job.prompt == PromptKind.crm_estimate:
            raise ValueError("a bundle carries no CRM logits: train residual or crm-estimate adapters with --dir")
        loaded = bundle.load(job.bundle_path)
        return loaded.meta.facts(), loaded.parts["train"], loaded.parts["valid"], loaded.answer, loaded.pad_id
    if job.directory is None:
        raise ValueError("give --dir or --bundle")
    residual, estimate = job.training.loss == Loss.residual, job.prompt == PromptKind.crm_estimate
    shots = asyncio.run(few_shot_prompts(settings, job.directory, job.n_train, job.n_valid, job.k,
                                         job.training.seed, crm_logits_of(settings) if residual or estimate else None,
                                         show_estimate=estimate))
    facts = shots.dataset.facts(job.n_train, job.k)
    facts["offset_crm"] = shots.crm if residual else None
    facts["prompt_crm"] = shots.crm if estimate else None
    return facts, shots.train, shots.valid, shots.codec.answer, shots.codec.pad_id


def train_reit(settings: Settings, job: ReitJob) -> dict:
    """Train (or resume, or only export a finished run) and export; the adapter's name, path, validation."""
    facts, train, valid, answer, pad_id = _prompts(settings, job)
    t, lora = job.training, job.training.lora
    run_name = reit_run_name(facts["dataset"], facts["n_train"], facts["k"], lora.rank, t.seed, t.loss,
                             ",".join(lora.target_modules), t.lr_schedule, t.warmup_steps)
    if facts.get("prompt_crm"):
        run_name += "-crmp"
    if facts.get("offset_crm") or facts.get("prompt_crm"):  # another CRM is another run
        run_name += "-" + (facts["offset_crm"] or facts["prompt_crm"]).rsplit("@", 1)[1][:6]
    run_dir = job.run_dir or settings.paths.run(job.name or run_name)
    state = train_lora(settings.model_dir, train, valid, answer, pad_id, run_dir, t)
    # A run cut short by its budget is exported under a name that says where it stopped, so the run can
    # go on later (under a larger --max-seconds) and export its final adapter as a new version.
    name = job.name or run_name + (f"-step{state.step}" if state.stopped == "time" else "")
    manifest = {"method": "reit", "dataset": facts["dataset"], "data_fingerprint": facts["data_fingerprint"],
                "split_sizes": facts["split_sizes"], "n_train_samples": facts["n_train"],
                "n_train_prompts": len(train), "n_valid": len(valid), "k": facts["k"],
                "lora": {"rank": lora.rank, "alpha": lora.alpha, "target_modules": lora.target_modules},
                "loss": t.loss, "lr": {"peak": t.lr, "schedule": t.lr_schedule, "warmup_steps": t.warmup_steps},
                "validation": state.best, "train_seconds": state.seconds, "steps": state.step,
                "epochs": state.epochs(), "device": state.settings.get("device", t.device),
                "stopped": state.stopped,
                "dtype": str(training_dtype(t.device, t.dtype)).removeprefix("torch."),
                "offset_crm": facts.get("offset_crm"), "prompt_crm": facts.get("prompt_crm"),
                "command": recorded_command()}
    exported = read_manifest(settings.registry_dir, name) if (settings.registry_dir / name).exists() else None
    if exported is not None and exported.validation == state.best:  # exported already (a finished run re-run)
        path = settings.registry_dir / name
    else:
        path = export_adapter(run_dir / "best", settings.registry_dir, name, settings.model_dir, manifest)
    return {"adapter": name, "path": str(path), "validation": state.best}
