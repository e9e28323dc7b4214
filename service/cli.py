"""The `lorec` command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import typer

from adapters.cli import eval_command, train_app
from service.config import Settings

app = typer.Typer(help="lorec: LLM recommendations behind a REST API.", no_args_is_help=True)
model_app = typer.Typer(help="The served model.", no_args_is_help=True)
ingest_app = typer.Typer(help="Load data into Redis and the item index.", no_args_is_help=True)
adapters_app = typer.Typer(help="The adapter registry.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(ingest_app, name="ingest")
app.add_typer(adapters_app, name="adapters")
app.add_typer(train_app, name="train")
app.command("eval")(eval_command)

DEFAULT_MOVIELENS = Path("../shared/data/ml-100k")
log = logging.getLogger("lorec")


def _logging() -> None:
    logging.basicConfig(level=os.environ.get("LOREC_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call is noise


@model_app.command("prepare")
def model_prepare() -> None:
    """Turn the packaged Gemma 3 270M GGUF into a bf16 HF folder (once), or check LOREC_MODEL."""
    from service.model import resolve_model

    _logging()
    settings = Settings()
    typer.echo(resolve_model(settings.model, settings.data_dir, prepare=True))


@ingest_app.command("movielens")
def ingest_movielens_command(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="ML-100K or ML-1M folder"),
    skip_bad_lines: bool = typer.Option(False, help="skip malformed lines instead of rejecting the file"),
) -> None:
    """Read GroupLens MovieLens files into Redis (history, catalog, profiles) and Qdrant (item vectors)."""
    _logging()
    typer.echo(json.dumps(_ingest_or_exit(Settings(), directory, skip_bad_lines)))


def _ingest_or_exit(settings: Settings, directory: Path, skip_bad_lines: bool = False) -> dict:
    """Ingests, or exits 2 with the reason when the files or the store refuse the data."""
    from service.ingest import MalformedFile, StoreMismatch, ingest_folder

    try:
        return asyncio.run(ingest_folder(settings, directory, skip_bad_lines))
    except (MalformedFile, StoreMismatch) as refused:
        typer.echo(f"ingest refused: {refused}", err=True)
        raise typer.Exit(2) from None


@adapters_app.command("list")
def adapters_list() -> None:
    """Adapters in the registry directory, with their validation AUC where a manifest has one."""
    from adapters.export import read_manifest
    from service.routing import AdapterRegistry

    settings = Settings()
    for name in AdapterRegistry(settings.registry_dir).names():
        manifest = read_manifest(settings.registry_dir, name)
        auc = (manifest.get("validation") or {}).get("auc")
        typer.echo(f"{name}\t{manifest.get('dataset', '-')}\tvalid_auc={auc if auc is None else round(auc, 4)}")


@app.command()
def ship(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="the MovieLens folder the "
                                                                                  "artifacts were trained on"),
    quality: Path = typer.Option(Path("benchmarks/results/quality.json"), help="figures to record beside them"),
) -> None:
    """Copy the configured served default (LOREC_DEFAULT_ADAPTER, LOREC_CRM, LOREC_COMBINER) into
    adapters/shipped/<dataset>/, which `lorec up` installs into a fresh data folder."""
    from adapters.offline import Dataset
    from adapters.ship import ship as ship_artifacts

    dataset = Dataset.read(directory)
    out = ship_artifacts(Settings(), dataset.name, dataset.data.fingerprint, quality)
    typer.echo(str(out))


@app.command()
def engine(port: int = typer.Option(8100), host: str = typer.Option("127.0.0.1")) -> None:
    """Run the vLLM engine server in the foreground."""
    from service.processes import engine_command, engine_env

    settings = Settings()
    command = engine_command(settings, settings.model_dir, port, host)
    os.execvpe(command[0], command, engine_env(settings))


@app.command()
def serve() -> None:
    """Run the gateway (Redis, Qdrant and the engine must be reachable). A store ingested from data that
    trained models ship for serves them when the deployment configures none (LOREC_CRM, ...)."""
    import uvicorn

    from service.app import create_app
    from service.ingest import stored_data_fingerprint
    from service.shipped import install_shipped

    _logging()
    settings = Settings()
    if not (settings.crm or settings.default_adapter or settings.combiner or settings.reclora_bank):
        settings = install_shipped(settings, asyncio.run(stored_data_fingerprint(settings)))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


@app.command()
def up(
    data: Path = typer.Option(None, envvar="LOREC_DATA", help=f"MovieLens folder (default {DEFAULT_MOVIELENS})"),
    engine_port: int = typer.Option(8100),
) -> None:
    """Everything on embedded defaults: redis-server, Qdrant Edge, vLLM, ingestion, the shipped trained
    models for that data (when the data folder configures none), the gateway."""
    import uvicorn

    from service.app import create_app
    from service.model import resolve_model
    from service.processes import Managed
    from service.shipped import install_shipped

    _logging()
    # SIGTERM must unwind through `finally` so the children stop too (uvicorn re-raises it on exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    settings = Settings()
    data = data or DEFAULT_MOVIELENS
    model_dir = resolve_model(settings.model, settings.data_dir, prepare=True)
    children: list[Managed] = []
    try:
        _start_redis(settings, children)
        settings, engine = _start_engine(settings, model_dir, engine_port, children)
        log.info("ingesting %s (skipped when already ingested)", data)
        report = _ingest_or_exit(settings, data)
        log.info("ingest: %s", report)
        settings = install_shipped(settings, report["fingerprint"])
        if engine is not None:
            log.info("waiting for the vLLM engine (log: %s)", engine.log_path)
            engine.wait_http(f"{settings.engine_url}/health", 900)
        gateway = create_app(settings)  # generates and prints an API key when none is configured
        log.info("ready after %.0fs; try (KEY: an API key, e.g. the one printed above, stored in %s):\n"
                 "  curl -s -X POST http://%s:%d/v1/rank -H \"authorization: Bearer $KEY\" "
                 "-H 'content-type: application/json'"
                 " -d '{\"user_id\": \"1\", \"item_ids\": [\"1\", \"50\", \"100\", \"181\", \"258\"], \"top_k\": 3, "
                 "\"options\": {\"explain\": true}}'",
                 time.monotonic() - started, settings.key_file, settings.host, settings.port)
        uvicorn.run(gateway, host=settings.host, port=settings.port, log_level="info")
    finally:
        for child in reversed(children):
            child.stop()


def _start_redis(settings: Settings, children: list) -> None:
    """redis-server on the data folder, unless one answers at LOREC_REDIS_URL already."""
    from service.processes import Managed, redis_command

    if _redis_answers(settings.redis_url):
        return
    redis_port = urlparse(settings.redis_url).port or 6379
    redis = Managed("redis-server", redis_command(settings.data_dir / "redis", redis_port),
                    settings.data_dir / "logs" / "redis.log")
    children.append(redis)
    redis.wait_redis(settings.redis_url, 30)


def _start_engine(settings: Settings, model_dir: Path, port: int, children: list) -> tuple[Settings, object]:
    """The vLLM engine on `port` (started, not yet waited for), unless LOREC_ENGINE_URL names one that
    answers already (another process's engine, e.g. a GPU box)."""
    import httpx

    from service.processes import Managed, engine_command, engine_env

    if "engine_url" in settings.model_fields_set:
        try:
            httpx.get(f"{settings.engine_urls[0]}/health", timeout=2).raise_for_status()
            log.info("using the engine at %s", settings.engine_url)
            return settings, None
        except httpx.HTTPError:
            log.info("no engine answers at %s: starting one on port %d", settings.engine_url, port)
    settings = settings.model_copy(update={"engine_url": f"http://127.0.0.1:{port}"})
    engine = Managed("vllm", engine_command(settings, model_dir, port), settings.data_dir / "logs" / "vllm.log",
                     env=engine_env(settings))
    children.append(engine)
    return settings, engine


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def main() -> None:
    from service.ingest import StoreMismatch

    try:
        app()
    except StoreMismatch as refused:  # a trainer or evaluator pointed at another dataset's store
        typer.echo(f"refused: {refused}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
