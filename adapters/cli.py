"""`lorec train ...` and `lorec eval`: the offline trainer's commands. Each parses its options and calls one
function of the module named after what it does; a refused input exits 2 with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from adapters import options as o
from adapters.bank import BankJob, train_bank
from adapters.combiner import TERM_SETS, fit_from_gateway
from adapters.crm import train_din_from_folder
from adapters.evaluate import EvalJob, evaluate, evaluate_crm
from adapters.gbdt import train_from_folder
from adapters.journal import JournalMismatch
from adapters.offline import split_sizes, write_bundle
from adapters.reclora import BankSettings
from adapters.records import record_result
from adapters.reit import ReitJob, train_reit
from service.config import Settings
from service.records import AdapterMode, RetrievalMode, Scorer

train_app = typer.Typer(help="Offline trainer: samples, CRMs, LoRA adapters, RecLoRA banks, combiners.",
                        no_args_is_help=True)
D = o.DEFAULTS
Out = Annotated[Path, typer.Option(help="the figures file (quality.json)")]
QUALITY = Path("benchmarks/results/quality.json")


def _refused(error: Exception) -> typer.Exit:
    typer.echo(f"refused: {error}", err=True)
    return typer.Exit(2)


@train_app.command("splits")
def splits(directory: o.Directory, out: Annotated[Path | None, typer.Option(help="also write the sizes here")] = None
           ) -> None:
    """Sample and split a MovieLens folder by the ReLLa protocol; print the sizes."""
    sizes = split_sizes(directory)
    typer.echo(json.dumps(sizes))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**previous, sizes["dataset"]: sizes}, indent=1) + "\n")


@train_app.command("prompts")
def prompts(directory: o.Directory, out: Annotated[Path, typer.Option(help="the bundle (.npz)")],
            n_train: o.NTrain = 1024, n_valid: o.NValid = 1000, k: o.K = 10, seed: o.Seed = D.seed,
            test_n: Annotated[int, typer.Option(help="also the seeded test slice `lorec eval --n` scores")] = 0,
            test_seed: Annotated[int, typer.Option(help="`lorec eval --seed` of that slice")] = 0) -> None:
    """Write a prompt bundle (train pool, validation, optional test slice) to fit or score elsewhere
    (`python -m adapters.bundle fit|score`, e.g. on a GPU machine)."""
    typer.echo(json.dumps(write_bundle(Settings(), directory, n_train, n_valid, k, seed, test_n, test_seed, out)))


@train_app.command("reit")
def reit(
    directory: Annotated[Path | None, typer.Option("--dir", exists=True, file_okay=False,
                                                   help="MovieLens folder")] = None,
    bundle_path: Annotated[Path | None, typer.Option("--bundle", exists=True, dir_okay=False,
                                                     help="train from a prompt bundle (`lorec train prompts`) "
                                                          "instead of --dir; its N, K and validation samples "
                                                          "replace --n, --k, --n-valid")] = None,
    n_train: o.NTrain = 1024, n_valid: o.NValid = 1000, k: o.K = 10,
    rank: o.Rank = D.lora.rank, alpha: o.Alpha = D.lora.alpha, target_modules: o.Targets = o.DEFAULT_TARGETS,
    lr: o.Lr = D.lr, batch_size: o.BatchSize = D.batch_size, max_epochs: o.MaxEpochs = D.max_epochs,
    lr_schedule: o.Schedule = o.LrSchedule.constant, warmup_steps: o.Warmup = D.warmup_steps,
    eval_every: o.EvalEvery = D.eval_every, patience: o.Patience = D.patience, seed: o.Seed = D.seed,
    loss: o.LossOption = o.Loss.vocab, device: o.Device = D.device, max_seconds: o.MaxSeconds = None,
    prompt: Annotated[o.PromptKind, typer.Option(help="rella, or crm-estimate: the prompt also shows the CRM's "
                                                      "(LOREC_CRM) estimate, which the gateway then writes too")
                      ] = o.PromptKind.rella,
    name: Annotated[str | None, typer.Option(help="adapter name in the registry (default: derived)")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="where checkpoints live; re-running resumes (a finished "
                                                      "run, e.g. fitted from a bundle, is only exported)")] = None,
) -> None:
    """Train a ReiT LoRA adapter (recent-K + SUBR-K prompts) and export it into the registry."""
    training = o.train_settings(rank, alpha, target_modules, lr, batch_size, max_epochs, lr_schedule, warmup_steps,
                                eval_every, patience, seed, loss, device, max_seconds)
    job = ReitJob(training, directory, bundle_path, n_train, n_valid, k, name, run_dir, prompt)
    try:
        typer.echo(json.dumps(train_reit(Settings(), job)))
    except ValueError as error:
        raise _refused(error) from None


@train_app.command("reclora")
def reclora(
    directory: o.Directory, n_train: o.NTrain = 1024, n_valid: o.NValid = 1000, k: o.K = 10,
    n_meta: Annotated[int, typer.Option(help="meta-LoRAs per module")] = 8,
    rank: o.Rank = D.lora.rank, alpha: o.Alpha = D.lora.alpha, target_modules: o.Targets = o.DEFAULT_TARGETS,
    temperature: Annotated[float, typer.Option(help="of the gate's softmax")] = 1.0,
    cohorts: Annotated[str, typer.Option(help="k-means sizes of the cohorts")] = "8,32,128",
    lr: o.Lr = D.lr, batch_size: o.BatchSize = D.batch_size, max_epochs: o.MaxEpochs = D.max_epochs,
    lr_schedule: o.Schedule = o.LrSchedule.constant, warmup_steps: o.Warmup = D.warmup_steps,
    eval_every: o.EvalEvery = D.eval_every, patience: o.Patience = D.patience, seed: o.Seed = D.seed,
    device: o.Device = D.device, max_seconds: o.MaxSeconds = None,
    name: Annotated[str | None, typer.Option(help="bank name under data_dir/reclora (default: derived)")] = None,
) -> None:
    """Train a RecLoRA bank (meta-LoRAs + gates over the frozen CRM's user vector) and its cohorts. The gate
    reads the feature CRM's user side (LOREC_CRM) when one is configured, else the DIN's user vector."""
    training = o.train_settings(rank, alpha, target_modules, lr, batch_size, max_epochs, lr_schedule, warmup_steps,
                                eval_every, patience, seed, device=device, max_seconds=max_seconds)
    bank = BankSettings(n_meta=n_meta, rank=rank, alpha=alpha, target_modules=training.lora.target_modules,
                        temperature=temperature)
    job = BankJob(directory, bank, training, n_train, n_valid, k, tuple(int(c) for c in cohorts.split(",")), name)
    try:
        typer.echo(json.dumps(train_bank(Settings(), job)))
    except ValueError as error:
        raise _refused(error) from None


@train_app.command("gbdt")
def gbdt(directory: o.Directory,
         name: Annotated[str | None, typer.Option(help="CRM name under LOREC_DATA_DIR/crm (default: "
                                                       "gbdt-<dataset>-<hash>)")] = None,
         threads: Annotated[int | None, typer.Option(help="LightGBM threads (default: all cores)")] = None,
         neighbours: Annotated[bool, typer.Option(help="add the neighbour features (a co-rating table of the "
                                                       "train split, service/corating.py)")] = True,
         taste: Annotated[bool, typer.Option(help="with the neighbour features, also those of the taste "
                                                  "similarity (the table then holds the ratings)")] = True) -> None:
    """The feature CRM: LightGBM over the point-in-time features on the whole train split, its settings
    chosen on validation (the test split is not read: `lorec eval` scores it)."""
    try:
        folder, manifest = train_from_folder(directory, Settings().data_dir, name, threads, neighbours, taste)
    except FileExistsError as error:
        raise _refused(error) from None
    typer.echo(json.dumps({"crm": manifest.name, "path": str(folder), "validation": manifest.validation}))


@train_app.command("combiner")
def combiner(
    directory: o.Directory,
    gateway: Annotated[str, typer.Option(help="the running gateway (serving the LLM and the CRM to combine)")]
    = "http://127.0.0.1:8000",
    n: Annotated[int, typer.Option(help="seeded validation samples to fit on")] = 2000,
    seed: Annotated[int, typer.Option(help="seed of the slice (not 1: `lorec train reit` draws its "
                                           "checkpoint-choice samples with seed 1)")] = 2,
    k: o.K = 10, retrieval: Annotated[RetrievalMode, typer.Option(help="history selection")] = "subr",
    name: Annotated[str | None, typer.Option(help="combiner name under LOREC_DATA_DIR/combiners")] = None,
    journal_dir: Annotated[Path | None, typer.Option(help="keep each gateway score in a journal here")] = None,
    term_sets: Annotated[str, typer.Option(help="candidate term sets, comma-separated (crm: the CRM alone)")]
    = ",".join(TERM_SETS),
) -> None:
    """The hybrid's combiner: logistic stacking of the LLM's and the CRM's logits (and interaction counts),
    fitted on validation samples scored through the gateway at their own as_of; the CRM alone where no term
    set with the LLM beats it."""
    try:
        folder, manifest = fit_from_gateway(Settings(), directory, gateway, n, seed, k, retrieval, name, journal_dir,
                                            term_sets=[t.strip() for t in term_sets.split(",") if t.strip()])
    except (ValueError, JournalMismatch) as error:
        raise _refused(error) from None
    typer.echo(json.dumps({"combiner": manifest.name, "path": str(folder), "terms": manifest.terms,
                           "validation": manifest.validation}))


@train_app.command("crm")
def crm(
    directory: o.Directory, epochs: Annotated[int, typer.Option(help="at most; early stopping on valid")] = 5,
    seed: o.Seed = 0,
    eval_n: Annotated[int, typer.Option(help="also report on this seeded test subsample (the LLM's)")] = 10_000,
    eval_seed: Annotated[int, typer.Option(help="seed of that subsample")] = 0, out: Out = QUALITY,
    record: Annotated[bool, typer.Option(help="record the figures in --out")] = True,
    side_info: Annotated[bool, typer.Option(help="DIN with the genres and release decade of every item and the "
                                                 "point-in-time features (DINPlus), recorded as crm-din-plus; "
                                                 "reported beside the feature CRM, not saved for serving")] = False,
) -> None:
    """Train the DIN baseline on the whole train split (last 60 behaviours); test once at the end."""
    dataset, method, result = train_din_from_folder(Settings(), directory, epochs, seed, eval_n, eval_seed,
                                                    side_info)
    typer.echo(json.dumps(result))
    if record:
        record_result(out, dataset, method, result)


def eval_command(
    directory: o.Directory,
    gateway: Annotated[str, typer.Option(help="the running gateway")] = "http://127.0.0.1:8000",
    adapter: Annotated[str, typer.Option(help='adapter name in the registry, or "base" (zero-shot)')] = "base",
    mode: Annotated[AdapterMode | None, typer.Option(help="adapter mode instead of a name: personal (the "
                                                          "gateway's RecLoRA bank), cohort, shared")] = None,
    scorer: Annotated[Scorer | None, typer.Option(help="hybrid, llm or crm (default: the gateway's); with a CRM "
                                                    "configured every component's figures are recorded too "
                                                    "(METHOD-llm, METHOD-crm), with the cold slices and the "
                                                    "served score's gain over the CRM")] = None,
    split: Annotated[Literal["train", "valid", "test"], typer.Option(help="the split")] = "test",
    n: Annotated[int, typer.Option(help="seeded subsample of the split (0: all of it)")] = 10_000,
    seed: Annotated[int, typer.Option(help="seed of the subsample")] = 0, k: o.K = 10,
    retrieval: Annotated[RetrievalMode, typer.Option(help="history selection")] = "subr",
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 8,
    slate_size: Annotated[int, typer.Option(help="score slates: one user's consecutive test samples, up to this "
                                                 "many per request at the earliest one's as_of (n // slate_size "
                                                 "slates); 0: one sample per request")] = 0,
    offline: Annotated[bool, typer.Option(help="also score with transformers + peft and compare")] = True,
    offline_n: Annotated[int, typer.Option(min=0, help="score only this seeded subsample offline (0: all); the "
                                                       "figures stay the gateway's on all of them")] = 0,
    crm: Annotated[bool, typer.Option("--crm", help="score the CRM instead, offline, no gateway, on the same "
                                                    "seeded samples: LOREC_CRM's artifact, else the DIN")] = False,
    offline_dtype: Annotated[str | None, typer.Option(help="dtype of the offline reference (bfloat16 or "
                                                           "float32); default: float32")] = None,
    method: Annotated[str | None, typer.Option(help="record under this method name in --out")] = None,
    out: Out = QUALITY,
    journal_dir: Annotated[Path | None, typer.Option(help="append each gateway score to a journal in this "
                                                          "folder; re-running the same evaluation goes on where "
                                                          "it stopped (not with --slate-size)")] = None,
) -> None:
    """AUC / LogLoss / ACC on a split through the running gateway (each sample at its own as_of)."""
    job = EvalJob(directory, gateway, adapter, mode, scorer, split, n, seed, k, retrieval, concurrency, slate_size,
                  offline, offline_n, offline_dtype, method, out, journal_dir)
    try:
        result = evaluate_crm(Settings(), job) if crm else evaluate(Settings(), job)
    except (ValueError, FileNotFoundError, JournalMismatch) as error:
        raise _refused(error) from None
    typer.echo(json.dumps(result))
    if (result.get("offline") or {}).get("agree") is False:
        typer.echo("gateway and offline scores differ: see offline.worst", err=True)
        raise typer.Exit(1)
