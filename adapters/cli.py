"""`lorec train ...`: the offline trainer's commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import typer

from service.config import Settings

train_app = typer.Typer(help="Offline trainer: samples, LoRA adapters.", no_args_is_help=True)


def dataset_name(data_name: str, directory: Path) -> str:
    """`ml-1m-u2999` for the users-1-2999 ratings file, else the format's name."""
    partial = any(directory.glob("ratings.users-1-2999.dat*")) and not any(directory.glob("ratings.dat*"))
    return f"{data_name}-u2999" if partial else data_name


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
async def offline_index(settings: Settings):
    """The gateway's item index, for reading. An embedded Qdrant Edge shard admits one process at
    a time, so the trainer reads a copy of it; a Qdrant server is shared as is."""
    from service.retrieval import open_index

    api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    if settings.qdrant_url:
        index = open_index(settings.qdrant_url, api_key, settings.qdrant_collection, settings.edge_path)
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
    async with offline_index(settings) as index:
        train = await reit_prompts(draw(parts["train"], n_train, seed), data, index, codec, k)
        valid = await reit_prompts(draw(parts["valid"], n_valid, seed + 1), data, index, codec, k,
                                   modes=(settings.retrieval_mode,))
    return data, parts, codec, train, valid


@train_app.command("reit")
def reit(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="MovieLens folder"),
    n_train: int = typer.Option(1024, "--n", help="few-shot samples drawn from train (each seen twice: ReiT)"),
    n_valid: int = typer.Option(1000, help="validation samples for checkpoint choice and early stopping"),
    k: int = typer.Option(10, help="behaviours per prompt"),
    rank: int = typer.Option(8), alpha: int = typer.Option(16),
    target_modules: str = typer.Option("q_proj,v_proj"),
    lr: float = typer.Option(1e-3), batch_size: int = typer.Option(8), max_epochs: int = typer.Option(2),
    eval_every: int = typer.Option(64), patience: int = typer.Option(3), seed: int = typer.Option(0),
    name: str = typer.Option(None, help="adapter name in the registry (default: derived, versioned)"),
    run_dir: Path = typer.Option(None, help="where checkpoints live; re-running resumes"),
) -> None:
    """Train a ReiT LoRA adapter (recent-K + SUBR-K prompts) and export it into the registry."""
    from adapters.export import export_adapter
    from adapters.train import LoraSettings, TrainSettings, train_lora

    settings = Settings()
    data, parts, codec, train, valid = asyncio.run(_prompts(settings, directory, n_train, n_valid, k, seed))
    dataset = dataset_name(data.name, directory)
    name = name or f"reit-{dataset}-n{n_train}-k{k}-r{rank}-s{seed}"
    run_dir = run_dir or settings.data_dir / "runs" / name
    lora = LoraSettings(rank=rank, alpha=alpha, target_modules=tuple(target_modules.split(",")))
    train_settings = TrainSettings(lora=lora, lr=lr, batch_size=batch_size, max_epochs=max_epochs,
                                   eval_every=eval_every, patience=patience, seed=seed)
    pad_id = codec.tokenizer.pad_token_id if codec.tokenizer.pad_token_id is not None else 0
    state = train_lora(settings.model_dir, train, valid, codec.answer, pad_id, run_dir, train_settings)
    manifest = {"method": "reit", "dataset": dataset, "data_fingerprint": data.fingerprint,
                "split_sizes": {k_: len(v) for k_, v in parts.items()}, "n_train_samples": n_train,
                "n_train_prompts": len(train), "n_valid": len(valid), "k": k,
                "lora": {"rank": rank, "alpha": alpha, "target_modules": lora.target_modules},
                "validation": state["best"], "train_seconds": state["seconds"], "steps": state["step"]}
    path = export_adapter(run_dir / "best", settings.registry_dir, name, settings.model_dir, manifest)
    typer.echo(json.dumps({"adapter": name, "path": str(path), "validation": state["best"]}))
