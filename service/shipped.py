"""The trained artifacts that ship with lorec, and their installation into a fresh data folder.

`adapters/shipped/<dataset>/` holds what the service serves by default for that dataset: the LLM
adapter (PEFT folder), the CRM and the combiner, each with its own manifest, and `manifest.json`
(`ShippedManifest`) naming them, the data they were trained on (fingerprint of the raw files) and
the commands that produced them (adapters/shipped/README.md). `lorec up` installs them into a data
folder that has no CRM, adapter or combiner configured, when the folder it ingests is that data:
the first command on a fresh machine serves the trained hybrid, not an untrained model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from service.artifacts import ArtifactError, DataPaths, Manifest, sha256_of
from service.config import Settings

log = logging.getLogger(__name__)
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "adapters" / "shipped"


class ShippedManifest(Manifest):
    FORMAT = "lorec.shipped"
    VERSION = 1

    dataset: str
    data_fingerprint: str
    base_model: str  # model_identity of the served model the adapter was trained on
    adapter: str  # folder under adapters/
    crm: str  # folder under crm/
    combiner: str  # folder under combiners/
    commands: list[str]  # what produced them, in order
    figures: dict  # validation and test figures of the served default and its components


def model_identity(model_dir: Path) -> str:
    """The served model, by its configuration's content: an adapter only fits the model it was trained on."""
    return sha256_of(model_dir / "config.json")[:12]


def shipped_for(data_fingerprint: str, root: Path = SHIPPED_ROOT) -> tuple[Path, ShippedManifest] | None:
    """The shipped artifacts trained on exactly these files (by their fingerprint), if any."""
    for manifest_file in sorted(root.glob("*/manifest.json")):
        manifest = ShippedManifest.load(manifest_file.parent)
        if manifest.data_fingerprint == data_fingerprint:
            return manifest_file.parent, manifest
    return None


def _copy(source: Path, target: Path) -> None:
    """Copy a folder in whole or not at all (a reader never sees half an artifact)."""
    if target.exists():
        return
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    staging.rename(target)


def install_shipped(settings: Settings, data_fingerprint: str | None, root: Path = SHIPPED_ROOT) -> Settings:
    """Settings serving the shipped hybrid trained on the store's data (by the raw files' fingerprint), its
    artifacts copied into the data folder; the settings unchanged when the deployment configures its own
    models, or nothing ships for this data."""
    if settings.scoring.crm or settings.adapters.default or settings.scoring.combiner or settings.adapters.bank:
        return settings
    found = shipped_for(data_fingerprint, root) if data_fingerprint else None
    if found is None:
        log.info("no trained models ship for the data this store holds: serving the base model")
        return settings
    folder, manifest = found
    dataset = manifest.dataset
    if manifest.base_model != model_identity(settings.model_dir):
        log.warning("the shipped %s models were trained on another base model than %s: not installed", dataset,
                    settings.model_dir)
        return settings
    adapter = settings.registry_dir / manifest.adapter
    shipped = DataPaths(folder)  # a shipped folder is laid out as a data folder
    _copy(shipped.adapters / manifest.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("base_model_name_or_path") != str(settings.model_dir.resolve()):
        config["base_model_name_or_path"] = str(settings.model_dir.resolve())  # this machine's served model
        (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    _copy(shipped.crm(manifest.crm), settings.paths.crm(manifest.crm))
    _copy(shipped.combiner(manifest.combiner), settings.paths.combiner(manifest.combiner))
    log.info("serving the shipped %s hybrid: adapter %s, CRM %s, combiner %s", dataset, manifest.adapter,
             manifest.crm, manifest.combiner)
    return settings.replace(**{"default_adapter": manifest.adapter, "adapter_mode": "shared",
                                       "crm": manifest.crm, "combiner": manifest.combiner})


__all__ = ["ArtifactError", "SHIPPED_ROOT", "ShippedManifest", "install_shipped", "model_identity", "shipped_for"]
