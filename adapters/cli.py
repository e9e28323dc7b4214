"""`lorec train ...`: the offline trainer's commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import typer

from adapters.bundle import LrSchedule
from service.config import Settings

train_app = typer.Typer(help="Offline trainer: samples, LoRA adapters.", no_args_is_help=True)
DEFAULT_TARGETS = "q_proj,v_proj"  # the default LoRA target modules


def dataset_name(data_name: str, directory: Path) -> str:
    """`ml-1m-u2999` for the users-1-2999 ratings file, else the format's name."""
    partial = any(directory.glob("ratings.users-1-2999.dat*")) and not any(directory.glob("ratings.dat*"))
    return f"{data_name}-u2999" if partial else data_name


def reit_run_name(dataset: str, n_train: int, k: int, rank: int, seed: int, loss: str, target_modules: str,
                  lr_schedule: str = "constant", warmup_steps: int = 0) -> str:
    """A ReiT run's name: what sets it apart from the default recipe is in it, so a variant is its own run."""
    name = f"reit-{dataset}-n{n_train}-k{k}-r{rank}-s{seed}" + ("" if loss == "vocab" else f"-{loss}")
    schedule = ("" if lr_schedule == "constant" else f"-{lr_schedule}") + (f"-w{warmup_steps}" if warmup_steps else "")
    return name + _targets_tag(target_modules) + schedule


def _targets_tag(target_modules: str) -> str:
    """'' for the default target modules, else e.g. '-q.k.v.o.gate.up.down' (ReiT runs and RecLoRA banks)."""
    if target_modules == DEFAULT_TARGETS:
        return ""
    return "-" + ".".join(m.removesuffix("_proj") for m in target_modules.split(","))


@train_app.command("splits")
def splits(directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False),
           out: Path = typer.Option(None, help="also write the sizes to this JSON file")) -> None:
    """Sample and split a MovieLens folder by the ReLLa protocol; print the sizes."""
    from adapters.samples import build_samples, split_by_time
    from service.ingest import read_movielens

    data = read_movielens(directory)
    parts = split_by_time(build_samples(data))
    sizes = {"dataset": dataset_name(data.name, directory), "ratings": len(data.ratings),
             **{k: len(v) for k, v in parts.items()},
             "positive_rate": {k: round(sum(s.label for s in v) / max(len(v), 1), 4) for k, v in parts.items()}}
    typer.echo(json.dumps(sizes))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**previous, sizes["dataset"]: sizes}, indent=1) + "\n")


@contextlib.asynccontextmanager
async def offline_index(settings: Settings, dataset: str):
    """The gateway's item index, for reading, once the store says it holds `dataset`. An embedded
    Qdrant Edge shard admits one process at a time, so the trainer reads a copy of it; a Qdrant
    server is shared as is."""
    from service.ingest import require_store_holds
    from service.retrieval import open_configured_index, open_index

    await require_store_holds(settings, dataset)
    if settings.qdrant_url:
        index = open_configured_index(settings)
        try:
            yield index
        finally:
            await index.close()
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "shard"
        shutil.copytree(settings.edge_path, copy)
        index = open_index(None, None, settings.qdrant_collection, copy)
        try:
            yield index
        finally:
            await index.close()


async def _prompts(settings: Settings, directory: Path, n_train: int, n_valid: int, k: int, seed: int):
    from adapters.samples import build_samples, draw, reit_prompts, split_by_time
    from service.ingest import read_movielens
    from service.prompt import load_codec

    data = read_movielens(directory)
    parts = split_by_time(build_samples(data))
    codec = load_codec(settings.model_dir)
    async with offline_index(settings, data.name) as index:
        train = await reit_prompts(draw(parts["train"], n_train, seed), data, index, codec, k)
        valid = await reit_prompts(draw(parts["valid"], n_valid, seed + 1), data, index, codec, k,
                                   modes=(settings.retrieval_mode,))
    return data, parts, codec, train, valid


def _with_crm_offsets(settings: Settings, data, parts: dict, train: list, valid: list) -> tuple[list, list, str]:
    """Each prompt with its sample's CRM logit as `offset` (residual training): out-of-fold for the train
    samples (the CRM saw them), the CRM's own for the validation samples; and the CRM's name@version."""
    import dataclasses

    from adapters.features import OfflineFeatures
    from adapters.gbdt import out_of_fold_logits
    from service.crm import Crm, crm_dir

    if not settings.crm:
        raise typer.BadParameter("residual training needs the CRM: set LOREC_CRM", param_hint="--loss")
    crm = Crm(crm_dir(settings.data_dir, settings.crm))
    features = OfflineFeatures(data, crm.spec)
    position = {(s.user_id, s.item_id, s.ts): i for i, s in enumerate(parts["train"])}
    wanted = sorted({position[(p.sample.user_id, p.sample.item_id, p.sample.ts)] for p in train})
    oof = out_of_fold_logits(crm.manifest.params, crm.spec.names, features.matrix(parts["train"], "train features"),
                             np.array([s.label for s in parts["train"]]), wanted)
    by_row = dict(zip(wanted, oof))
    train = [dataclasses.replace(p, offset=float(by_row[position[(p.sample.user_id, p.sample.item_id, p.sample.ts)]]))
             for p in train]
    valid_logits = crm.logits(features.matrix([p.sample for p in valid]))
    valid = [dataclasses.replace(p, offset=float(o)) for p, o in zip(valid, valid_logits)]
    return train, valid, f"{crm.name}@{crm.version}"


def _run_facts(data, directory: Path, parts: dict, n_train: int, k: int) -> dict:
    """What an adapter's manifest says of its data (a bundle carries the same)."""
    return {"dataset": dataset_name(data.name, directory), "data_fingerprint": data.fingerprint,
            "split_sizes": {name: len(v) for name, v in parts.items()}, "n_train": n_train, "k": k}


@train_app.command("prompts")
def prompts(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="MovieLens folder"),
    n_train: int = typer.Option(1024, "--n", help="few-shot samples drawn from train (each seen twice: ReiT)"),
    n_valid: int = typer.Option(1000), k: int = typer.Option(10), seed: int = typer.Option(0),
    test_n: int = typer.Option(0, help="also the seeded test slice `lorec eval --n` scores (0: none)"),
    test_seed: int = typer.Option(0, help="`lorec eval --seed` of that slice"),
    out: Path = typer.Option(..., help="the bundle (.npz)"),
) -> None:
    """Write a prompt bundle (train pool, validation, optional test slice) to fit or score elsewhere
    (`python -m adapters.bundle fit|score`, e.g. on a GPU machine)."""
    from adapters import bundle

    settings = Settings()
    data, parts, codec, train, valid = asyncio.run(_prompts(settings, directory, n_train, n_valid, k, seed))
    rows = {"train": bundle.from_prompted(train), "valid": bundle.from_prompted(valid)}
    if test_n:  # the slice and prompts `lorec eval --n test_n --seed test_seed` scores offline
        from adapters.samples import draw

        test = draw(parts["test"], test_n, test_seed)
        rows["test"] = bundle.from_prompted(asyncio.run(_offline_prompted(settings, data, test, k,
                                                                          settings.retrieval_mode)))
    meta = {**_run_facts(data, directory, parts, n_train, k), "seed": seed, "retrieval": settings.retrieval_mode,
            "test_seed": test_seed, "model": Path(settings.model_dir).name,
            "answer": {"yes": codec.answer.yes, "no": codec.answer.no}, "pad_id": codec.pad_id}
    bundle.save(out, bundle.Bundle(meta, rows))
    typer.echo(json.dumps({"bundle": str(out), **{p: len(r) for p, r in rows.items()},
                           "tokens": sum(len(r.input_ids) for part in rows.values() for r in part)}))


@train_app.command("reit")
def reit(
    directory: Path = typer.Option(None, "--dir", exists=True, file_okay=False, help="MovieLens folder"),
    bundle_path: Path = typer.Option(None, "--bundle", exists=True, dir_okay=False,
                                     help="train from a prompt bundle (`lorec train prompts`) instead of --dir; "
                                          "its N, K and validation samples replace --n, --k, --n-valid"),
    n_train: int = typer.Option(1024, "--n", help="few-shot samples drawn from train (each seen twice: ReiT)"),
    n_valid: int = typer.Option(1000, help="validation samples for checkpoint choice and early stopping"),
    k: int = typer.Option(10, help="behaviours per prompt"),
    rank: int = typer.Option(8), alpha: int = typer.Option(16),
    target_modules: str = typer.Option(DEFAULT_TARGETS),
    lr: float = typer.Option(1e-3), batch_size: int = typer.Option(8), max_epochs: int = typer.Option(2),
    lr_schedule: LrSchedule = typer.Option(LrSchedule.constant, help="learning rate after warmup"),
    warmup_steps: int = typer.Option(0, min=0),
    eval_every: int = typer.Option(64, min=1, help="optimizer steps between validation evaluations"),
    patience: int = typer.Option(3, min=1, help="scheduled evaluations without a better validation AUC "
                                                "before the run stops"),
    seed: int = typer.Option(0),
    loss: str = typer.Option("vocab", help="vocab (LM cross-entropy on the answer token), pair (logistic "
                                           "loss on logit Yes - logit No) or residual (pair with the CRM's "
                                           "logit, LOREC_CRM, added: the adapter learns what the CRM misses)"),
    device: str = typer.Option("cpu", help="torch device to train on (cpu, cuda)"),
    max_seconds: float = typer.Option(None, help="time budget; the best checkpoint so far is exported"),
    name: str = typer.Option(None, help="adapter name in the registry (default: derived, versioned)"),
    run_dir: Path = typer.Option(None, help="where checkpoints live; re-running resumes (a finished run, "
                                            "e.g. fitted from a bundle elsewhere, is only exported)"),
) -> None:
    """Train a ReiT LoRA adapter (recent-K + SUBR-K prompts) and export it into the registry."""
    import sys

    from adapters import bundle
    from adapters.export import export_adapter, read_manifest
    from adapters.train import LoraSettings, TrainSettings, train_lora, training_dtype

    settings = Settings()
    if bundle_path is not None and loss == "residual":
        raise typer.BadParameter("a bundle carries no CRM offsets: train residual adapters with --dir",
                                 param_hint="--loss")
    if bundle_path is not None:
        loaded = bundle.load(bundle_path)
        facts, train, valid = loaded.meta, loaded.parts["train"], loaded.parts["valid"]
        answer, pad_id = loaded.answer, loaded.pad_id
    elif directory is not None:
        data, parts, codec, train, valid = asyncio.run(_prompts(settings, directory, n_train, n_valid, k, seed))
        facts = _run_facts(data, directory, parts, n_train, k)
        answer, pad_id = codec.answer, codec.pad_id
        if loss == "residual":
            train, valid, facts["offset_crm"] = _with_crm_offsets(settings, data, parts, train, valid)
    else:
        raise typer.BadParameter("give --dir or --bundle", param_hint="--dir")
    n_train, k = facts["n_train"], facts["k"]
    run_name = reit_run_name(facts["dataset"], n_train, k, rank, seed, loss, target_modules, lr_schedule.value,
                             warmup_steps)
    if facts.get("offset_crm"):  # another CRM is another run
        run_name += "-" + facts["offset_crm"].rsplit("@", 1)[1][:6]
    run_dir = run_dir or settings.data_dir / "runs" / (name or run_name)
    lora = LoraSettings(rank=rank, alpha=alpha, target_modules=tuple(target_modules.split(",")))
    train_settings = TrainSettings(lora=lora, lr=lr, lr_schedule=lr_schedule.value, warmup_steps=warmup_steps,
                                   batch_size=batch_size, max_epochs=max_epochs, eval_every=eval_every,
                                   patience=patience, seed=seed, loss=loss, device=device, max_seconds=max_seconds)
    state = train_lora(settings.model_dir, train, valid, answer, pad_id, run_dir, train_settings)
    # A run cut short by its budget is exported under a name that says where it stopped, so the run can
    # go on later (under a larger --max-seconds) and export its final adapter as a new version.
    name = name or run_name + (f"-step{state['step']}" if state.get("stopped") == "time" else "")
    manifest = {"method": "reit", "dataset": facts["dataset"], "data_fingerprint": facts["data_fingerprint"],
                "split_sizes": facts["split_sizes"], "n_train_samples": n_train,
                "n_train_prompts": len(train), "n_valid": len(valid), "k": k,
                "lora": {"rank": rank, "alpha": alpha, "target_modules": lora.target_modules}, "loss": loss,
                "lr": {"peak": lr, "schedule": lr_schedule.value, "warmup_steps": warmup_steps},
                "validation": state["best"], "train_seconds": state["seconds"], "steps": state["step"],
                "epochs": _epochs(state, len(train)),
                "device": state["settings"].get("device", device), "stopped": state.get("stopped"),
                "dtype": str(training_dtype(device, train_settings.dtype)).removeprefix("torch."),
                "offset_crm": facts.get("offset_crm"),
                "command": "lorec train " + " ".join(sys.argv[2:])}
    if (settings.registry_dir / name).exists() and read_manifest(settings.registry_dir, name).get("validation") \
            == state["best"]:  # this run was exported already (a re-run of a finished run)
        path = settings.registry_dir / name
    else:
        path = export_adapter(run_dir / "best", settings.registry_dir, name, settings.model_dir, manifest)
    typer.echo(json.dumps({"adapter": name, "path": str(path), "validation": state["best"]}))


@train_app.command("reclora")
def reclora(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="MovieLens folder"),
    n_train: int = typer.Option(1024, "--n", help="few-shot samples drawn from train (each seen twice: ReiT)"),
    n_valid: int = typer.Option(1000), k: int = typer.Option(10),
    n_meta: int = typer.Option(8, help="meta-LoRAs per module"), rank: int = typer.Option(8),
    alpha: int = typer.Option(16), target_modules: str = typer.Option(DEFAULT_TARGETS),
    temperature: float = typer.Option(1.0), cohorts: str = typer.Option("8,32,128", help="k-means sizes"),
    lr: float = typer.Option(1e-3), batch_size: int = typer.Option(8), max_epochs: int = typer.Option(2),
    eval_every: int = typer.Option(64, min=1), patience: int = typer.Option(3, min=1), seed: int = typer.Option(0),
    name: str = typer.Option(None, help="bank name under data_dir/reclora (default: derived)"),
) -> None:
    """Train a RecLoRA bank (meta-LoRAs + gates over the frozen CRM's user vector) and its cohorts. The gate
    reads the feature CRM's user side (LOREC_CRM) when one is configured, else the DIN's user vector."""
    from adapters.reclora import BankSettings, cohort_centroids, gate_vectors, load_reclora, save_cohorts, train_reclora
    from adapters.train import TrainSettings

    settings = Settings()
    data, parts, codec, train, valid = asyncio.run(_prompts(settings, directory, n_train, n_valid, k, seed))
    dataset = dataset_name(data.name, directory)
    crm_ref = settings.crm or f"{dataset}-din.pt"
    if not settings.crm and not (settings.data_dir / "crm" / crm_ref).exists():
        raise typer.BadParameter(f"no CRM: set LOREC_CRM (lorec train gbdt) or run `lorec train crm` for "
                                 f"{settings.data_dir / 'crm' / crm_ref}", param_hint="--dir")
    users = gate_vectors(settings.data_dir, crm_ref, [p.sample for p in [*train, *valid]], data)
    gate_tag = "" if crm_ref.endswith(".pt") else "-gbdt"
    name = name or f"reclora-{dataset}-n{n_train}-m{n_meta}-r{rank}-s{seed}" + _targets_tag(target_modules) + gate_tag
    run_dir = settings.data_dir / "runs" / name
    bank = BankSettings(n_meta=n_meta, rank=rank, alpha=alpha, target_modules=tuple(target_modules.split(",")),
                        temperature=temperature)
    state = train_reclora(settings.model_dir, train, valid, users, codec.answer, codec.pad_id, run_dir,
                          TrainSettings(lr=lr, batch_size=batch_size, max_epochs=max_epochs, eval_every=eval_every,
                                        patience=patience, seed=seed), bank)
    model = load_reclora(settings.model_dir, bank_dir=run_dir / "best")
    out = settings.data_dir / "reclora" / name
    model.save(out, {"base_model": str(settings.model_dir), "crm": crm_ref, "dataset": dataset,
                     "n_train_samples": n_train, "validation": state["best"], "train_seconds": state["seconds"],
                     "epochs": _epochs(state, len(train))})
    # Cohorts over every train user's vector at their last train sample.
    last = {s.user_id: s for s in parts["train"]}
    train_users = gate_vectors(settings.data_dir, crm_ref, list(last.values()), data)
    save_cohorts(out, {int(c): cohort_centroids(model, train_users, int(c), seed) for c in cohorts.split(",")})
    typer.echo(json.dumps({"bank": name, "path": str(out), "validation": state["best"],
                           "cohorts": cohorts, "train_seconds": state["seconds"]}))


def record_result(path: Path, dataset: str, method: str, result: dict) -> None:
    """Merge one method's figures into `{dataset: {method: {...}}}` (benchmarks/results/quality.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault(dataset, {})[method] = result
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


async def _offline_prompted(settings: Settings, data, samples, k: int, mode: str) -> list:
    """The samples' prompts in one retrieval mode, as the gateway writes them (PromptedSamples)."""
    from adapters.samples import reit_prompts
    from service.prompt import load_codec

    async with offline_index(settings, data.name) as index:
        return await reit_prompts(samples, data, index, load_codec(settings.model_dir), k, modes=(mode,))


async def _offline_prompts(settings: Settings, data, samples, k: int, mode: str) -> list[list[int]]:
    return [p.input_ids for p in await _offline_prompted(settings, data, samples, k, mode)]


def _epochs(state: dict, n_prompts: int) -> float:
    """Epochs of training behind the exported (best) checkpoint, not the run's last step."""
    return round(state["best"]["step"] * state["settings"]["batch_size"] / n_prompts, 3)


def _training_facts(settings: Settings, adapter: str, mode: str | None) -> dict:
    """n_train, train_seconds and epochs of what is evaluated, from the adapter's manifest or the bank's."""
    from adapters.export import read_manifest
    from service.routing import BASE

    if mode in ("personal", "cohort"):
        meta = json.loads((settings.reclora_dir / "reclora.json").read_text())
    elif mode is None and adapter != BASE:
        meta = read_manifest(settings.registry_dir, adapter)
    else:
        return {}
    facts = {"n_train": meta.get("n_train_samples"), "train_seconds": meta.get("train_seconds"),
             "epochs": meta.get("epochs")}
    return {key: value for key, value in facts.items() if value is not None}


def _offline_model(settings: Settings, data, samples, adapter: str, mode: str | None, dtype):
    """The transformers model the served scores must equal: base, a registry adapter, or (personal mode)
    the RecLoRA bank gated on each sample's CRM user vector."""
    from adapters.train import load_model
    from service.routing import BASE, AdapterRegistry

    if mode == "personal":
        from adapters.reclora import gate_vectors, load_reclora
        from service.personalize import MetaBank

        users = gate_vectors(settings.data_dir, MetaBank(settings.reclora_dir).crm, samples, data)
        model = load_reclora(settings.model_dir, bank_dir=settings.reclora_dir, dtype=dtype)
        return model, lambda m, rows: m.set_users(users[list(rows)])
    if mode == "shared":
        adapter = settings.default_adapter or BASE
    adapter_dir = None if adapter == BASE else AdapterRegistry(settings.registry_dir).path(adapter)
    return load_model(settings.model_dir, adapter_dir=adapter_dir, dtype=dtype), None


def _score_crm(settings: Settings, data, dataset: str, samples) -> dict:
    """The configured feature CRM (LOREC_CRM) on `samples`, offline; without one, the DIN file."""
    from adapters.evaluate import summarize

    if settings.crm:
        from adapters.features import OfflineFeatures
        from service.crm import Crm, crm_dir

        crm = Crm(crm_dir(settings.data_dir, settings.crm))
        logits = crm.logits(OfflineFeatures(data, crm.spec).matrix(samples, progress="features"))
        return {**summarize(samples, 1 / (1 + np.exp(-logits))), "n_test": len(samples), "kind": "crm",
                "crm": f"{crm.name}@{crm.version}", "validation": crm.manifest.validation}
    from adapters.crm import encode, predict
    from service.din import load_crm

    path = settings.data_dir / "crm" / f"{dataset}-din.pt"
    if not path.exists():
        raise typer.BadParameter(f"no CRM {path.name} under {path.parent}: run `lorec train crm` first",
                                 param_hint="--crm")
    model, vocab = load_crm(path)
    scores = predict(model, encode(samples, data, vocab))
    return {**summarize(samples, scores), "n_test": len(samples), "kind": "crm", "crm": path.name}


def eval_command(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="MovieLens folder"),
    gateway: str = typer.Option("http://127.0.0.1:8000", help="the running gateway"),
    adapter: str = typer.Option("base", help='adapter name in the registry, or "base" (zero-shot)'),
    mode: str = typer.Option(None, help="adapter mode instead of a name: personal (the gateway's RecLoRA bank), "
                                        "cohort, shared"),
    split: str = typer.Option("test"),
    n: int = typer.Option(10_000, help="seeded subsample of the split (0: all of it)"),
    seed: int = typer.Option(0),
    k: int = typer.Option(10), retrieval: str = typer.Option("subr"),
    concurrency: int = typer.Option(8),
    slate_size: int = typer.Option(0, help="score slates: one user's consecutive test samples, up to this many "
                                           "per request at the earliest one's as_of (n // slate_size slates); "
                                           "0: one sample per request"),
    offline: bool = typer.Option(True, help="also score with transformers + peft and compare"),
    offline_n: int = typer.Option(0, min=0, help="score only this seeded subsample of the evaluated samples "
                                                 "offline (0: all); the figures stay the gateway's on all of them"),
    crm: bool = typer.Option(False, "--crm", help="score the CRM instead, offline, no gateway, on the same seeded "
                                                  "samples: LOREC_CRM's artifact, else LOREC_DATA_DIR/crm/"
                                                  "<dataset>-din.pt"),
    offline_dtype: str = typer.Option(None, help="dtype of the offline reference (bfloat16 or float32); "
                                                 "default: the engine's (LOREC_ENGINE_DTYPE)"),
    method: str = typer.Option(None, help="record under this method name in --out"),
    out: Path = typer.Option(Path("benchmarks/results/quality.json")),
    journal_dir: Path = typer.Option(None, help="append each gateway score to a journal in this folder, one file "
                                                "per evaluation and code version; re-running the same evaluation "
                                                "goes on where it stopped (not with --slate-size)"),
    scorer: str = typer.Option(None, help="hybrid, llm or crm (default: the gateway's); with a CRM configured, "
                                          "every component's figures are recorded too (METHOD-llm, METHOD-crm), "
                                          "with the cold slices and the served score's gain over the CRM"),
) -> None:
    """AUC / LogLoss / ACC on a split through the running gateway (each sample at its own as_of)."""
    import sys
    import time

    import torch

    from adapters.evaluate import agreement, score_via_gateway, summarize
    from adapters.samples import build_samples, draw, split_by_time
    from adapters.train import score
    from service.ingest import read_movielens, require_store_holds
    from service.prompt import load_codec

    settings = Settings()
    data = read_movielens(directory)
    if mode in ("personal", "cohort") and settings.reclora_dir is None:
        raise typer.BadParameter("set LOREC_RECLORA_BANK to the bank the gateway serves", param_hint="--mode")
    dataset = dataset_name(data.name, directory)
    pool = split_by_time(build_samples(data))[split]
    if crm:  # the CRM on exactly the LLM rows' samples (the `lorec train crm` row uses its own slice)
        result = {**_score_crm(settings, data, dataset, draw(pool, n, seed) if n else pool),
                  "split": split, "seed": seed, "command": "lorec eval " + " ".join(sys.argv[2:])}
        typer.echo(json.dumps(result))
        if method:
            record_result(out, dataset, method, result)
        return
    asyncio.run(require_store_holds(settings, data.name))  # before an hour of scoring another catalogue
    facts = _training_facts(settings, adapter, mode)
    offline_dtype = offline_dtype or settings.engine_dtype
    from service.auth import client_key

    started = time.monotonic()
    if slate_size:
        if journal_dir:
            raise typer.BadParameter("slate evaluations keep no journal", param_hint="--journal-dir")
        _eval_slates(gateway, pool, n, slate_size, seed, adapter, k, retrieval, client_key(settings), method, out,
                     dataset, started)
        return
    samples = draw(pool, n, seed) if n else pool
    journal = None
    if journal_dir:
        journal = _journal(journal_dir, settings, samples, dataset=dataset, split=split, n=n, seed=seed,
                           adapter=adapter, mode=mode, k=k, retrieval=retrieval, method=method,
                           **({"scorer": scorer} if scorer else {}))
    served = asyncio.run(score_via_gateway(gateway, samples, adapter, k, retrieval, concurrency,
                                           api_key=client_key(settings), mode=mode, journal=journal, scorer=scorer))
    served_scorer = max(served.scorers, key=served.scorers.get) if served.scorers else "llm"
    result = {**summarize(samples, served.scores), "n_test": len(samples), "split": split, "seed": seed,
              "k": k, "retrieval": retrieval, "adapter": mode or adapter, "kind": served_scorer,
              "served_by": served.adapters, "scorers": served.scorers,
              "gateway_seconds": round(served.seconds, 1),
              "command": "lorec eval " + " ".join(sys.argv[2:])}
    if served.resumed:
        result["resumed_from_journal"] = served.resumed
    result.update(facts)
    if offline and mode == "cohort":
        offline = False  # no offline reference for cohort routing; the personal mode covers the bank
    if offline:  # the same computation outside vLLM, on all evaluated samples or a seeded part of them
        checked = draw(range(len(samples)), offline_n, seed) if offline_n else range(len(samples))
        subset = [samples[i] for i in checked]
        prompts = asyncio.run(_offline_prompts(settings, data, subset, k, retrieval))
        codec = load_codec(settings.model_dir)
        model, prepare = _offline_model(settings, data, subset, adapter, mode, getattr(torch, offline_dtype))
        offline_scores = score(model, prompts, codec.answer, codec.pad_id, progress="offline", prepare=prepare)
        result["offline"] = {**summarize(subset, offline_scores), "n": len(subset), "dtype": offline_dtype,
                             **agreement(subset, [_llm_score(served, i) for i in checked], offline_scores,
                                         [served.prompts[i] for i in checked], prompts)}
    components = _components(data, samples, served) if any(c.get("crm") is not None for c in served.components) \
        else None
    typer.echo(json.dumps(result if components is None else {**result, "components": components}))
    if method:
        record_result(out, dataset, method, result)
        if components is not None:
            _record_components(out, dataset, method, result, components)
    if offline and not result["offline"]["agree"]:
        typer.echo("gateway and offline scores differ: see offline.worst", err=True)
        raise typer.Exit(1)


def _llm_score(served, i: int) -> float:
    """The LLM's own score of sample i (explain's component; the served score when only the LLM scored)."""
    llm = served.components[i].get("llm") if served.components else None
    return served.scores[i] if llm is None else llm


def _components(data, samples, served) -> dict:
    from adapters.evaluate import component_report
    from adapters.features import OfflineFeatures

    features = OfflineFeatures(data)
    names = list(features.spec.names)
    matrix = features.matrix(samples, progress="features")
    return component_report(samples, served, matrix[:, names.index("u_n")], matrix[:, names.index("i_n")])


def _record_components(out: Path, dataset: str, method: str, result: dict, components: dict) -> None:
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
        path_results = json.loads(out.read_text())
        gain = components["all"]["served_vs_crm"]
        path_results[dataset]["served_default"] = method
        path_results[dataset]["served_vs_best_crm"] = {"crm": f"{method}-crm", **gain}
        out.write_text(json.dumps(path_results, indent=1, sort_keys=True) + "\n")


def _journal(folder: Path, settings: Settings, samples, **evaluation):
    """The journal of this evaluation: named by a hash of what it is (options, adapter or bank, code version),
    so another evaluation gets its own file; what an earlier run scored is read back."""
    import hashlib

    from adapters.evaluate import Journal, JournalMismatch
    from adapters.export import git_commit

    key = {**evaluation, "samples": len(samples), "git_commit": git_commit(),
           "bank": settings.reclora_dir.name if evaluation["mode"] in ("personal", "cohort") else None}
    label = evaluation["method"] or evaluation["mode"] or evaluation["adapter"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    journal = Journal(folder / f"{evaluation['dataset']}-{label}-{digest}.jsonl", key)
    try:
        journal.load(samples)
    except JournalMismatch as error:
        raise typer.BadParameter(str(error), param_hint="--journal-dir") from None
    if journal.rows:
        typer.echo(f"resuming: {len(journal.rows)} of {len(samples)} samples from {journal.path}", err=True)
    return journal


def _eval_slates(gateway: str, pool, n: int, size: int, seed: int, adapter: str, k: int, retrieval: str,
                 api_key: str | None, method: str | None, out: Path, dataset: str, started: float) -> None:
    """Quality when each request carries a slate (what `slate` retrieval shares one history over)."""
    import sys
    import time

    from adapters.evaluate import score_slates_via_gateway, slates, summarize

    groups = slates(pool, max(1, n // size), size, seed)
    scores = asyncio.run(score_slates_via_gateway(gateway, groups, adapter, k, retrieval, api_key=api_key))
    samples = [s for g in groups for s in g]
    result = {**summarize(samples, [p for ps in scores for p in ps]), "n_test": len(samples), "slates": len(groups),
              "slate_size": size, "seed": seed, "k": k, "retrieval": retrieval, "adapter": adapter, "kind": "llm",
              "gateway_seconds": round(time.monotonic() - started, 1),
              "command": "lorec eval " + " ".join(sys.argv[2:])}
    typer.echo(json.dumps(result))
    if method:
        record_result(out, dataset, method, result)


@train_app.command("gbdt")
def gbdt(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="MovieLens folder"),
    name: str = typer.Option(None, help="CRM name under LOREC_DATA_DIR/crm (default: gbdt-<dataset>-<hash>)"),
    threads: int = typer.Option(None, help="LightGBM threads (default: all cores)"),
) -> None:
    """The feature CRM: LightGBM over the point-in-time features on the whole train split, its settings
    chosen on validation (the test split is not read: `lorec eval` scores it)."""
    import sys

    from adapters.gbdt import train_from_folder

    folder, manifest = train_from_folder(directory, Settings().data_dir, name,
                                         "lorec train " + " ".join(sys.argv[2:]), threads)
    typer.echo(json.dumps({"crm": manifest.name, "path": str(folder), "validation": manifest.validation}))


@train_app.command("combiner")
def combiner(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="MovieLens folder"),
    gateway: str = typer.Option("http://127.0.0.1:8000", help="the running gateway (serving the LLM and the "
                                                               "CRM to combine)"),
    n: int = typer.Option(2000, help="seeded validation samples to fit on"),
    seed: int = typer.Option(2, help="seed of the slice (not 1: `lorec train reit` draws its checkpoint-choice "
                                     "samples with seed 1)"),
    k: int = typer.Option(10), retrieval: str = typer.Option("subr"),
    name: str = typer.Option(None, help="combiner name under LOREC_DATA_DIR/combiners"),
    journal_dir: Path = typer.Option(None, help="keep each gateway score in a journal here (resumable)"),
) -> None:
    """The hybrid's combiner: logistic stacking of the LLM's and the CRM's logits (and interaction counts),
    fitted on validation samples scored through the gateway at their own as_of."""
    import sys

    from adapters.combiner import fit_from_gateway

    folder, manifest = fit_from_gateway(Settings(), directory, gateway, n, seed, k, retrieval, name, journal_dir,
                                        "lorec train " + " ".join(sys.argv[2:]))
    typer.echo(json.dumps({"combiner": manifest.name, "path": str(folder), "terms": manifest.terms,
                           "validation": manifest.validation}))


@train_app.command("crm")
def crm(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="MovieLens folder"),
    epochs: int = typer.Option(5), seed: int = typer.Option(0),
    eval_n: int = typer.Option(10_000, help="also report on this seeded test subsample (the LLM's slice)"),
    eval_seed: int = typer.Option(0),
    out: Path = typer.Option(Path("benchmarks/results/quality.json")),
    record: bool = typer.Option(True, help="record the figures in --out"),
    side_info: bool = typer.Option(False, help="DIN with the genres and release decade of every item and the "
                                               "point-in-time features (DINPlus), recorded as crm-din-plus; "
                                               "reported beside the feature CRM, not saved for serving"),
) -> None:
    """Train the DIN baseline on the whole train split (last 60 behaviours); test once at the end."""
    import sys

    from adapters.crm import Vocab, encode, predict, train_din
    from adapters.samples import build_samples, draw, split_by_time
    from adapters.train import metrics
    from service.din import save_crm
    from service.ingest import read_movielens

    settings = Settings()
    data = read_movielens(directory)
    parts = split_by_time(build_samples(data))
    vocab = Vocab.of(data)
    batches = {name: encode(samples, data, vocab) for name, samples in parts.items()}
    sliced = draw(parts["test"], eval_n, eval_seed)
    batches["slice"] = encode(sliced, data, vocab)
    model = _din_plus(data, vocab, parts, sliced, batches) if side_info else None
    model, report = train_din(batches["train"], batches["valid"], vocab, epochs=epochs, seed=seed, model=model)
    dataset = dataset_name(data.name, directory)
    test_full = metrics([s.label for s in parts["test"]], predict(model, batches["test"]))
    test_slice = metrics([s.label for s in sliced], predict(model, batches["slice"]))
    if not side_info:
        save_crm(model, vocab, settings.data_dir / "crm" / f"{dataset}-din.pt")
    result = {**test_slice, "n_test": len(sliced), "n_train": len(parts["train"]), "kind": "crm",
              "test_full": test_full, "valid": report["valid"], "train_seconds": round(report["train_seconds"], 1),
              "seed": eval_seed, "command": "lorec train " + " ".join(sys.argv[2:])}
    typer.echo(json.dumps(result))
    if record:
        record_result(out, dataset, "crm-din-plus" if side_info else "crm-din", result)


def _din_plus(data, vocab, parts: dict, sliced, batches: dict):
    """DINPlus and its dense inputs: the point-in-time features, standardized on train."""
    import torch

    from adapters.features import OfflineFeatures
    from service.crm import Standardizer
    from service.din import DINPlus, item_tables

    features = OfflineFeatures(data)
    matrices = {name: features.matrix(samples, progress=f"{name} features") for name, samples in parts.items()}
    matrices["slice"] = features.matrix(sliced)
    scale = Standardizer.fit(matrices["train"])
    for name, matrix in matrices.items():
        batches[name].dense = torch.tensor(scale.apply(matrix), dtype=torch.float32)
    genres, decades = item_tables(vocab, data.items, features.spec.genres)
    torch.manual_seed(0)
    return DINPlus(vocab, genres, decades, matrices["train"].shape[1])
