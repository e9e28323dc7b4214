"""`lorec eval`: AUC, LogLoss and accuracy on a split, through the running gateway and offline.

Through the gateway, each sample is one `/v1/ctr` request at `as_of` its own timestamp (gateway_scores.py).
Offline, the same samples are scored with transformers + peft from prompts built by the same modules; the
LLM's served and offline scores must agree (mean |delta p| < 0.01), else the report lists where they
differ most. With a CRM configured every answer carries each component's score (`explain`), and one
pass records the served score and its components on the same samples, with the cold slices and the
served score's gain over the CRM; the CRM's served scores must equal the CRM's on the data's files (a
store holding writes dated inside the data's time is refused, its answers kept in the journal). `--crm`
scores the CRM alone offline on the same seeded samples.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.export import read_manifest
from adapters.features import OfflineFeatures
from adapters.figures import agreement, component_report, crm_agreement, require_crm_agreement, summarize
from adapters.gateway_scores import GatewayScores, score_slates_via_gateway, score_via_gateway, slates
from adapters.journal import open_journal
from adapters.offline import Dataset, prompted
from adapters.reclora import gate_vectors, load_reclora
from adapters.records import record_dataset_facts, record_result, recorded_command
from adapters.samples import Sample, draw
from adapters.train import load_model, score
from service.auth import client_key
from service.config import Settings
from service.crm import Crm, crm_dir
from service.din import load_crm
from service.ingest import require_store_holds
from service.personalize import BankManifest, MetaBank
from service.prompt import load_codec
from service.routing import BASE, AdapterRegistry
from service.shipped import install_shipped


@dataclass
class EvalJob:
    directory: Path
    gateway: str = "http://127.0.0.1:8000"
    adapter: str = "base"
    mode: str | None = None
    scorer: str | None = None
    split: str = "test"
    n: int = 10_000
    seed: int = 0
    k: int = 10
    retrieval: str = "subr"
    concurrency: int = 8
    slate_size: int = 0
    offline: bool = True
    offline_n: int = 0
    offline_dtype: str | None = None
    method: str | None = None
    out: Path = Path("benchmarks/results/quality.json")
    journal_dir: Path | None = None


def training_facts(settings: Settings, adapter: str, mode: str | None) -> dict:
    """n_train, train_seconds and epochs of what is evaluated, from the adapter's manifest or the bank's."""
    if mode in ("personal", "cohort"):
        meta = BankManifest.load(settings.reclora_dir).model_dump()
    elif mode is None and adapter != BASE:
        manifest = read_manifest(settings.registry_dir, adapter)
        meta = manifest.model_dump() if manifest else {}
    else:
        return {}
    facts = {"n_train": meta.get("n_train_samples"), "train_seconds": meta.get("train_seconds"),
             "epochs": meta.get("epochs")}
    return {key: value for key, value in facts.items() if value is not None}


def offline_model(settings: Settings, data, samples: list[Sample], adapter: str, mode: str | None,
                  dtype: torch.dtype):
    """The transformers model the served scores must equal: base, a registry adapter, or (personal mode)
    the RecLoRA bank gated on each sample's CRM user vector; and what to run before each batch."""
    if mode == "personal":
        users = gate_vectors(settings.data_dir, MetaBank(settings.reclora_dir).crm, samples, data)
        model = load_reclora(settings.model_dir, bank_dir=settings.reclora_dir, dtype=dtype)
        return model, lambda m, rows: m.set_users(users[list(rows)])
    if mode == "shared":
        adapter = settings.adapters.default or BASE
    adapter_dir = None if adapter == BASE else AdapterRegistry(settings.registry_dir).path(adapter)
    return load_model(settings.model_dir, adapter_dir=adapter_dir, dtype=dtype), None


def shown_crm_logits(settings: Settings, dataset: Dataset, samples: list[Sample], adapter: str,
                     mode: str | None) -> list[float] | None:
    """The CRM logits the evaluated adapter's prompts show (its manifest's `prompt_crm`), as the gateway
    computes them; None for an adapter (or bank) whose prompts show none."""
    if mode in ("personal", "cohort"):
        return None
    name = settings.adapters.default if mode == "shared" else adapter
    manifest = read_manifest(settings.registry_dir, name) if name and name != BASE else None
    if manifest is None or manifest.prompt_crm is None:
        return None
    crm = Crm(crm_dir(settings.data_dir, settings.scoring.crm)) if settings.scoring.crm else None
    if crm is None or crm.ref != manifest.prompt_crm:
        raise ValueError(f"adapter {name!r} reads CRM {manifest.prompt_crm}'s estimate: set LOREC_CRM to it")
    return [float(x) for x in crm.logits(OfflineFeatures(dataset.data, crm.spec).matrix(samples))]


def crm_figures(settings: Settings, dataset: Dataset, samples: list[Sample]) -> dict:
    """The configured feature CRM (LOREC_CRM) on `samples`, offline; without one, the DIN file."""
    if settings.scoring.crm:
        crm = Crm(crm_dir(settings.data_dir, settings.scoring.crm))
        logits = crm.logits(OfflineFeatures(dataset.data, crm.spec).matrix(samples, progress="features"))
        return {**summarize(samples, 1 / (1 + np.exp(-logits))), "n_test": len(samples), "kind": "crm",
                "crm": crm.ref, "validation": crm.manifest.validation}
    from adapters.crm import encode, predict

    path = settings.paths.crm(f"{dataset.name}-din.pt")
    if not path.exists():
        raise FileNotFoundError(f"no CRM: set LOREC_CRM, or run `lorec train crm` for {path}")
    model, vocab = load_crm(path)
    return {**summarize(samples, predict(model, encode(samples, dataset.data, vocab))), "n_test": len(samples),
            "kind": "crm", "crm": path.name}


def _llm_score(served: GatewayScores, i: int) -> float:
    """The LLM's own score of sample i (explain's component; the served score when only the LLM scored)."""
    llm = served.components[i].get("llm") if served.components else None
    return served.scores[i] if llm is None else llm


def _llm_scored(served: GatewayScores, kind: str) -> bool:
    return kind == "llm" or any(c.get("llm") is not None for c in served.components)


def offline_check(settings: Settings, job: EvalJob, dataset: Dataset, samples: list[Sample],
                  served: GatewayScores) -> dict:
    """The same computation outside vLLM, on all evaluated samples or a seeded part of them."""
    checked = draw(range(len(samples)), job.offline_n, job.seed) if job.offline_n else range(len(samples))
    subset = [samples[i] for i in checked]
    shown = shown_crm_logits(settings, dataset, subset, job.adapter, job.mode)
    prompts = [p.input_ids for p in asyncio.run(prompted(settings, dataset.data, subset, job.k, job.retrieval,
                                                         shown))]
    codec = load_codec(settings.model_dir)
    dtype = job.offline_dtype or "float32"  # what a bf16 engine's answer logits are computed in, too
    model, prepare = offline_model(settings, dataset.data, subset, job.adapter, job.mode, getattr(torch, dtype))
    offline_scores = score(model, prompts, codec.answer, codec.pad_id, progress="offline", prepare=prepare)
    return {**summarize(subset, offline_scores), "n": len(subset), "dtype": dtype,
            **agreement(subset, [_llm_score(served, i) for i in checked], offline_scores,
                        [served.prompts[i] for i in checked], prompts)}


def components_of(settings: Settings, dataset: Dataset, samples: list[Sample], served: GatewayScores
                  ) -> tuple[dict | None, dict | None]:
    """Each component's figures on all samples and the cold slices, when the answers carried them, and the CRM's
    served scores against the CRM the gateway serves, run on the data's files (refused where they differ)."""
    scored = [i for i, c in enumerate(served.components) if c.get("crm") is not None]
    if not scored:
        return None, None
    crm = served_crm(settings, dataset)
    features = OfflineFeatures(dataset.data, crm.spec if crm else None)
    names = list(features.spec.names)
    matrix = features.matrix(samples, progress="features")
    check = None
    if crm is not None:
        check = crm_agreement([samples[i] for i in scored], [served.components[i]["crm"] for i in scored],
                              crm.logits(matrix[scored]))
        require_crm_agreement(check)
    components = component_report(samples, served, matrix[:, names.index("u_n")], matrix[:, names.index("i_n")])
    return components, check


def served_crm(settings: Settings, dataset: Dataset) -> Crm | None:
    """The CRM `lorec serve` answers with on these settings: LOREC_CRM, or the one shipped for this data
    (installed into the data folder, as `lorec serve` installs it, where it is not there yet)."""
    name = install_shipped(settings, dataset.data.fingerprint).scoring.crm
    return Crm(crm_dir(settings.data_dir, name)) if name else None


def record_components(out: Path, dataset: str, method: str, result: dict, components: dict) -> None:
    """Each component's row beside the served one (same samples), and the dataset's served-vs-CRM figure."""
    shared = {k: result[k] for k in ("n_test", "split", "seed", "k", "retrieval", "adapter", "command")}
    for part in ("llm", "crm"):
        if part in components["all"]:
            slices = {name: {**v[part], "n": v["n"]} for name, v in components.items() if part in v}
            record_result(out, dataset, f"{method}-{part}", {**components["all"][part], **shared, "kind": part,
                                                             "component_of": method, "slices": slices})
    served = {name: {k: v for k, v in slice_.items() if k not in ("llm", "crm")}
              for name, slice_ in components.items()}
    record_result(out, dataset, method, {**result, "slices": served})
    if result["kind"] == "hybrid" and result["split"] == "test":
        record_dataset_facts(out, dataset, served_default=method,
                             served_vs_best_crm={"crm": f"{method}-crm", **components["all"]["served_vs_crm"]})


def evaluate_slates(settings: Settings, job: EvalJob, pool: list[Sample], dataset: str, started: float) -> dict:
    """Quality when each request carries a slate (what `slate` retrieval shares one history over)."""
    groups = slates(pool, max(1, job.n // job.slate_size), job.slate_size, job.seed)
    scores = asyncio.run(score_slates_via_gateway(job.gateway, groups, job.adapter, job.k, job.retrieval,
                                                  api_key=client_key(settings)))
    samples = [s for g in groups for s in g]
    result = {**summarize(samples, [p for ps in scores for p in ps]), "n_test": len(samples), "slates": len(groups),
              "slate_size": job.slate_size, "seed": job.seed, "k": job.k, "retrieval": job.retrieval,
              "adapter": job.adapter, "kind": "llm", "gateway_seconds": round(time.monotonic() - started, 1),
              "command": recorded_command()}
    if job.method:
        record_result(job.out, dataset, job.method, result)
    return result


def evaluate(settings: Settings, job: EvalJob) -> dict:
    """Score the seeded slice through the gateway (and offline), record the figures; returns them."""
    dataset = Dataset.read(job.directory)
    if job.mode in ("personal", "cohort") and settings.reclora_dir is None:
        raise ValueError("set LOREC_RECLORA_BANK to the bank the gateway serves")
    pool = dataset.parts[job.split]
    asyncio.run(require_store_holds(settings, dataset.data.name))  # before an hour of scoring another catalogue
    started = time.monotonic()
    if job.slate_size:
        if job.journal_dir:
            raise ValueError("slate evaluations keep no journal")
        return evaluate_slates(settings, job, pool, dataset.name, started)
    samples = draw(pool, job.n, job.seed) if job.n else pool
    journal = None
    if job.journal_dir:
        bank = settings.reclora_dir.name if job.mode in ("personal", "cohort") else None
        journal = open_journal(job.journal_dir, samples, bank, dataset=dataset.name, split=job.split, n=job.n,
                               seed=job.seed, adapter=job.adapter, mode=job.mode, k=job.k, retrieval=job.retrieval,
                               method=job.method, **({"scorer": job.scorer} if job.scorer else {}))
    served = asyncio.run(score_via_gateway(job.gateway, samples, job.adapter, job.k, job.retrieval, job.concurrency,
                                           api_key=client_key(settings), mode=job.mode, journal=journal,
                                           scorer=job.scorer))
    kind = max(served.scorers, key=served.scorers.get) if served.scorers else "llm"
    result = {**summarize(samples, served.scores), "n_test": len(samples), "split": job.split, "seed": job.seed,
              "k": job.k, "retrieval": job.retrieval, "adapter": job.mode or job.adapter, "kind": kind,
              "served_by": served.adapters, "scorers": served.scorers, "gateway_seconds": round(served.seconds, 1),
              "command": recorded_command(), **training_facts(settings, job.adapter, job.mode)}
    if served.resumed:
        result["resumed_from_journal"] = served.resumed
    # No offline reference for cohort routing (personal covers the bank), nor where no LLM scored (the hybrid of
    # a combiner that kept the CRM alone).
    if job.offline and job.mode != "cohort" and _llm_scored(served, kind):
        result["offline"] = offline_check(settings, job, dataset, samples, served)
    components, crm_check = components_of(settings, dataset, samples, served)
    if crm_check is not None:
        result["crm_offline"] = crm_check
    if job.method:
        record_result(job.out, dataset.name, job.method, result)
        if components is not None:
            record_components(job.out, dataset.name, job.method, result, components)
    return result if components is None else {**result, "components": components}


def evaluate_crm(settings: Settings, job: EvalJob) -> dict:
    """`lorec eval --crm`: the CRM alone, offline, on exactly the LLM rows' seeded samples."""
    dataset = Dataset.read(job.directory)
    pool = dataset.parts[job.split]
    result = {**crm_figures(settings, dataset, draw(pool, job.n, job.seed) if job.n else pool),
              "split": job.split, "seed": job.seed, "command": recorded_command()}
    if job.method:
        record_result(job.out, dataset.name, job.method, result)
    return result
