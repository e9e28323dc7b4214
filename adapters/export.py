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
import subprocess
import time
from pathlib import Path

from service.routing import AdapterRegistry

MANIFEST = "manifest.json"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


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
    full = {"name": name, "base_model": str(base_model.resolve()), "git_commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}
    (staging / MANIFEST).write_text(json.dumps(full, indent=2))
    staging.rename(target)  # the registry never shows a half-written adapter
    AdapterRegistry(registry).path(name)  # it must be servable
    return target


def read_manifest(registry: Path, name: str) -> dict:
    path = AdapterRegistry(registry).path(name) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}
