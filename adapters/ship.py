"""`lorec ship`: copy the served default of a data folder (adapter, CRM, combiner) into adapters/shipped/.

The three artifacts are the ones the deployment is configured with (LOREC_DEFAULT_ADAPTER, LOREC_CRM,
LOREC_COMBINER); the combiner must name the other two, by version, or nothing is shipped. The adapter
is copied without training state (PEFT files and manifest only). The shipped manifest records the
commands that produced each artifact and the figures of the served default from quality.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from adapters.export import read_manifest
from service.artifacts import DataPaths
from service.combine import Combiner, ComponentRef, combiner_dir, llm_serving, refusal
from service.config import Settings
from service.crm import Crm, crm_dir
from service.routing import AdapterRegistry
from service.shipped import SHIPPED_ROOT, ShippedManifest, model_identity

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "manifest.json")


def figures_of(quality: Path, dataset: str) -> dict:
    """The served default's rows (and its components') from quality.json, when recorded."""
    if not quality.exists():
        return {}
    rows = json.loads(quality.read_text()).get(dataset, {})
    method = rows.get("served_default")
    if not method:
        return {}
    keep = ("auc", "logloss", "acc", "n_test", "split", "kind", "slices")
    return {"served_default": method, "served_vs_best_crm": rows.get("served_vs_best_crm"),
            **{m: {k: v for k, v in rows[m].items() if k in keep}
               for m in (method, f"{method}-llm", f"{method}-crm") if m in rows}}


def ship(settings: Settings, dataset: str, data_fingerprint: str, quality: Path, root: Path = SHIPPED_ROOT) -> Path:
    if not (settings.adapters.default and settings.scoring.crm and settings.scoring.combiner):
        raise ValueError("set LOREC_DEFAULT_ADAPTER, LOREC_CRM and LOREC_COMBINER to the served default")
    registry = AdapterRegistry(settings.registry_dir)
    crm = Crm(crm_dir(settings.data_dir, settings.scoring.crm))
    combiner = Combiner(combiner_dir(settings.data_dir, settings.scoring.combiner))
    why = refusal(combiner, ComponentRef(name=crm.name, version=crm.version),
                  llm_serving("shared", settings.adapters.default, settings, registry, None))
    if why is not None:
        raise ValueError(f"not shipped: {why}")
    for manifest in (crm.manifest, combiner.manifest):
        if manifest.data_fingerprint != data_fingerprint:
            raise ValueError(f"{manifest.name} was trained on other files than {dataset}'s")
    out = root / dataset
    shutil.rmtree(out, ignore_errors=True)
    shipped = DataPaths(out)  # laid out as a data folder
    adapter_out = shipped.adapters / settings.adapters.default
    adapter_out.mkdir(parents=True)
    source = registry.path(settings.adapters.default)
    for file in ADAPTER_FILES:
        if (source / file).exists():
            shutil.copy2(source / file, adapter_out / file)
    _name_the_base_model(adapter_out, settings.model_dir.name)
    shutil.copytree(crm.folder, shipped.crm(crm.name))
    shutil.copytree(settings.paths.combiner(combiner.name), shipped.combiner(combiner.name))
    adapter_manifest = read_manifest(settings.registry_dir, settings.adapters.default)
    commands = [c for c in (adapter_manifest.command if adapter_manifest else None, crm.manifest.command,
                            combiner.manifest.command) if c]
    ShippedManifest.new(dataset=dataset, data_fingerprint=data_fingerprint,
                        base_model=model_identity(settings.model_dir), adapter=settings.adapters.default,
                        crm=crm.name, combiner=combiner.name, commands=commands,
                        figures=figures_of(quality, dataset)).save(out)
    return out


def _name_the_base_model(adapter: Path, model_name: str) -> None:
    """This machine's model path means nothing elsewhere: the adapter names its base model by folder name
    (the install rewrites it to the served model's path, after checking `model_identity`)."""
    for file, key in (("adapter_config.json", "base_model_name_or_path"), ("manifest.json", "base_model")):
        if (adapter / file).exists():
            values = json.loads((adapter / file).read_text())
            values[key] = model_name
            (adapter / file).write_text(json.dumps(values, indent=2) + "\n")
