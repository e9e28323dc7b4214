"""Export a trained adapter into the registry the gateway serves from.

One folder per adapter version: the PEFT files (`adapter_config.json`,
`adapter_model.safetensors`, `base_model_name_or_path` set to the served
model) and `manifest.json` (base model, training data, sizes, validation
metrics, git commit). A new version is a new name, never an overwrite: vLLM
keys its prefix cache by adapter name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from service.artifacts import MANIFEST, AdapterManifest, git_commit
from service.routing import AdapterRegistry

__all__ = ["MANIFEST", "AdapterManifest", "export_adapter", "git_commit", "read_manifest"]


def export_adapter(trained: Path, registry: Path, name: str, base_model: Path, manifest: dict) -> Path:
    """Copy a saved PEFT folder into `registry/name` with its manifest; refuses to overwrite."""
    target = registry / name
    if target.exists():
        raise FileExistsError(f"adapter {name!r} exists: a new version needs a new name")
    registry.mkdir(parents=True, exist_ok=True)
    staging = registry / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(trained / file, staging / file)
    config = json.loads((staging / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_model.resolve())
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
    AdapterManifest.new(name=name, base_model=str(base_model.resolve()), **manifest).save(staging)
    staging.rename(target)  # the registry never shows a half-written adapter
    AdapterRegistry(registry).path(name)  # it must be servable
    return target


def read_manifest(registry: Path, name: str) -> AdapterManifest | None:
    """The adapter's manifest; None for an adapter without one (e.g. copied in by hand)."""
    folder = AdapterRegistry(registry).path(name)
    return AdapterManifest.load(folder) if (folder / MANIFEST).exists() else None
