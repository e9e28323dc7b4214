"""The `lorec` command."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import typer
import uvicorn

from adapters.cli import eval_command, train_app
from adapters.export import read_manifest
from adapters.offline import Dataset
from adapters.ship import ship as ship_artifacts
from service.app import create_app
from service.config import Settings
from service.ingest import MalformedFile, StoreMismatch, ingest_folder, stored_data_fingerprint
from service.model import engine_weights, resolve_model
from service.processes import engine_command, engine_env
from service.prompt import load_codec
from service.routing import AdapterRegistry
from service.shipped import install_shipped
from service.stack import Stack
from service.warmup import warm_engine

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
    logging.basicConfig(level=Settings().server.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call is noise


@model_app.command("prepare")
def model_prepare() -> None:
    """Turn the packaged Gemma 3 270M GGUF into a bf16 HF folder (once), or check LOREC_MODEL."""
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
    try:
        return asyncio.run(ingest_folder(settings, directory, skip_bad_lines))
    except (MalformedFile, StoreMismatch) as refused:
        typer.echo(f"ingest refused: {refused}", err=True)
        raise typer.Exit(2) from None


@adapters_app.command("list")
def adapters_list() -> None:
    """Adapters in the registry directory, with their validation AUC where a manifest has one."""
    settings = Settings()
    for name in AdapterRegistry(settings.registry_dir).names():
        manifest = read_manifest(settings.registry_dir, name)
        auc = ((manifest.validation if manifest else None) or {}).get("auc")
        dataset = (manifest.dataset if manifest else None) or "-"
        typer.echo(f"{name}\t{dataset}\tvalid_auc={auc if auc is None else round(auc, 4)}")


@app.command()
def ship(
    directory: Path = typer.Option(..., "--dir", exists=True, file_okay=False, help="the MovieLens folder the "
                                                                                  "artifacts were trained on"),
    quality: Path = typer.Option(Path("benchmarks/results/quality.json"), help="figures to record beside them"),
) -> None:
    """Copy the configured served default (LOREC_DEFAULT_ADAPTER, LOREC_CRM, LOREC_COMBINER) into
    adapters/shipped/<dataset>/, which `lorec up` installs into a fresh data folder."""
    dataset = Dataset.read(directory)
    out = ship_artifacts(Settings(), dataset.name, dataset.data.fingerprint, quality)
    typer.echo(str(out))


@app.command()
def engine(
    port: int = typer.Option(8100),
    host: str = typer.Option("127.0.0.1"),
    ready_file: Path = typer.Option(None, help="created once the engine has scored its warm-up batch (what "
                                    "readiness probes check), removed at start"),
) -> None:
    """Run the vLLM engine server in the foreground; it is ready once it has scored a warm-up batch shaped
    like a request through the base model (the gateway warms each adapter it serves)."""
    _logging()
    settings = Settings()
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)
    weights = engine_weights(settings.engine, settings.model_dir)
    server = subprocess.Popen(engine_command(settings.engine, weights, port, host),
                              env=engine_env(settings.engine, weights))
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        state = asyncio.run(warm_engine(f"http://{local}:{port}", settings.engine.model_name,
                                        load_codec(settings.model_dir), settings.engine.warmup_candidates,
                                        settings.requests.history_k, settings.prompt_budget,
                                        alive=lambda: server.poll() is None))
        if state.done and ready_file is not None:
            ready_file.touch()
        raise typer.Exit(server.wait())
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(60)


@app.command()
def serve() -> None:
    """Run the gateway (Redis, Qdrant and the engine must be reachable). A store ingested from data that
    trained models ship for serves them when the deployment configures none (LOREC_CRM, ...)."""
    _logging()
    settings = Settings()
    if not (settings.scoring.crm or settings.adapters.default or settings.scoring.combiner or settings.adapters.bank):
        settings = install_shipped(settings, asyncio.run(stored_data_fingerprint(settings)))
    uvicorn.run(create_app(settings), host=settings.server.host, port=settings.server.port, log_level="info")


@app.command()
def up(
    data: Path = typer.Option(None, envvar="LOREC_DATA", help=f"MovieLens folder (default {DEFAULT_MOVIELENS})"),
    engine_port: int = typer.Option(8100),
) -> None:
    """Everything on embedded defaults: redis-server, Qdrant Edge, vLLM, ingestion, the shipped trained
    models for that data (when the data folder configures none), the gateway."""
    _logging()
    # SIGTERM must unwind through `finally` so the children stop too (uvicorn re-raises it on exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    settings = Settings()
    data = data or DEFAULT_MOVIELENS
    model_dir = resolve_model(settings.model, settings.data_dir, prepare=True)
    with Stack(settings.data_dir / "logs") as stack:
        stack.redis(settings.data_dir / "redis", settings.redis.url)
        engine = None if _engine_answers(settings) else stack.engine(settings, model_dir, engine_port, wait=False)
        if engine is not None:
            settings = settings.replace(**{"engine_url": engine[0]})
        log.info("ingesting %s (skipped when already ingested)", data)
        report = _ingest_or_exit(settings, data)
        log.info("ingest: %s", report)
        settings = install_shipped(settings, report["fingerprint"])
        if engine is not None:
            log.info("waiting for the vLLM engine (log: %s)", engine[1].log_path)
            stack.wait_engine(*engine)
        gateway = create_app(settings)  # generates and prints an API key when none is configured
        log.info("gateway starting after %.0fs; it is ready (GET /readyz) once the engine has scored the warm-up "
                 "requests. Then try (KEY: an API key, e.g. the one printed above, stored in %s):\n"
                 "  curl -s -X POST http://%s:%d/v1/rank -H \"authorization: Bearer $KEY\" "
                 "-H 'content-type: application/json'"
                 " -d '{\"user_id\": \"1\", \"item_ids\": [\"1\", \"50\", \"100\", \"181\", \"258\"], \"top_k\": 3, "
                 "\"options\": {\"explain\": true}}'",
                 time.monotonic() - started, settings.key_file, settings.server.host, settings.server.port)
        uvicorn.run(gateway, host=settings.server.host, port=settings.server.port, log_level="info")


@app.command()
def stack(
    redis: bool = typer.Option(False, "--redis", help="redis-server for LOREC_REDIS_URL, unless one answers there"),
    engine_port: int = typer.Option(None, help="the vLLM engine of LOREC_MODEL on this port"),
    gateway_port: int = typer.Option(None, help="`lorec serve` on this port, configured by this environment"),
) -> None:
    """Start parts of the stack in the foreground (what the benchmark scripts run in the background): each
    waited for until it answers, then `ready` is printed; SIGTERM or Ctrl-C stops them all."""
    _logging()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = Settings()
    with Stack(settings.data_dir / "logs") as parts:
        if redis:
            parts.redis(settings.data_dir / "redis", settings.redis.url)
        if engine_port:
            parts.engine(settings, port=engine_port)
        if gateway_port:
            parts.gateway({}, port=gateway_port)
        typer.echo("ready", err=True)
        while True:
            signal.pause()


def _engine_answers(settings: Settings) -> bool:
    """LOREC_ENGINE_URL names an engine that answers (another process's, e.g. a GPU box): use it."""
    if "engine_url" not in settings.model_fields_set:
        return False
    try:
        httpx.get(f"{settings.engine.urls[0]}/health", timeout=2).raise_for_status()
    except httpx.HTTPError:
        log.info("no engine answers at %s: starting one", settings.engine.url)
        return False
    log.info("using the engine at %s", settings.engine.url)
    return True


def main() -> None:
    try:
        app()
    except StoreMismatch as refused:  # a trainer or evaluator pointed at another dataset's store
        typer.echo(f"refused: {refused}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
