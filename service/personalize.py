"""RecLoRA personalisation (part of stage 5, routing): a user's own LoRA, mixed from a meta-LoRA bank.

A bank folder (written by `lorec train reclora`) holds, per adapted module,
N meta-LoRAs (A_k: r x in, B_k: out x r) and a gate over the CRM's user vector:
`reclora.safetensors`, `reclora.json` (settings), and `cohorts.safetensors`
(k-means centroids of users' mixing weights). A user's adapter is
A_u = sum_k alpha_k A_k, B_u = sum_k alpha_k B_k with alpha = gate(u): a plain
rank-r LoRA, written here as a PEFT folder vLLM loads.

Personal adapters are named `p-<bank>-<bank hash>-<user hash>-v<version>`, the
version counting `refresh_events` events of history, so a grown history (or a
retrained bank) gets a new name (vLLM keys its prefix cache by adapter name)
and the old one ages out of the on-disk LRU cache. Cohort adapters
`c-<bank>-<bank hash>-<C>-<i>` mix the centroids.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from service.artifacts import DataPaths, Manifest
from service.crm import Crm, crm_dir
from service.din import DIN, Vocab, encode_rows
from service.records import UserContext
from service.routing import ModeUnavailable


class NoCohorts(ModeUnavailable):
    pass


class NoGateInput(ModeUnavailable):
    pass


class Gate(nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear -> softmax(/ temperature) over the bank."""

    def __init__(self, user_dim: int, n_meta: int, hidden: int, temperature: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(user_dim), nn.Linear(user_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_meta))
        self.temperature = temperature

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(users) / self.temperature, -1)


def mix(alpha: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_u, B_u) for each row of alpha (batch, n_meta): shapes (batch, r, in) and (batch, out, r)."""
    return torch.einsum("bk,kri->bri", alpha, lora_a), torch.einsum("bk,kor->bor", alpha, lora_b)


def write_peft_adapter(out: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: int,
                       base_model: str, manifest: dict | None = None) -> Path:
    """A plain PEFT LoRA folder from {module name: (A, B)}; written aside, then renamed into place."""
    tensors = {}
    for name, (a, b) in weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    targets = sorted({name.rsplit(".", 1)[-1] for name in weights})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None, "use_rslora": False,
              "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
              "alpha_pattern": {}}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    if manifest is not None:
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        os.rename(tmp, out)  # a reader never sees a half-written adapter
    except OSError:
        _discard(tmp)
        if not (out / "adapter_config.json").exists():  # not a concurrent writer of the same adapter
            raise
    return out


def _discard(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@dataclass
class BankModule:
    lora_a: torch.Tensor  # (n_meta, r, in)
    lora_b: torch.Tensor  # (n_meta, out, r)
    gate: Gate


class BankManifest(Manifest):
    """A bank's `reclora.json`: its settings, the CRM its gates read, what it was trained on."""

    FORMAT = "lorec.reclora-bank"
    VERSION = 1
    FILE = "reclora.json"
    LEGACY = True  # banks saved before the format was named carry the same fields

    settings: dict  # adapters.reclora.BankSettings as a dict
    user_dim: int
    base_model: str = ""
    crm: str = ""  # a DIN file (*.pt) or a feature CRM artifact under data_dir/crm
    dataset: str | None = None
    n_train_samples: int | None = None
    validation: dict | None = None
    train_seconds: float | None = None
    epochs: float | None = None


class MetaBank:
    """A trained RecLoRA bank, read-only: gates and meta-LoRAs per module."""

    def __init__(self, path: Path, n_cohorts: int = 32) -> None:
        self.manifest = BankManifest.load(path)
        s = self.manifest.settings
        self.name = path.name
        self.rank, self.alpha, self.user_dim = s["rank"], s["alpha"], self.manifest.user_dim
        self.base_model = self.manifest.base_model
        self.crm = self.manifest.crm
        weights = path / "reclora.safetensors"
        # Adapter names carry the bank's content hash: a retrained bank never reuses a cached adapter.
        self.version = hashlib.sha1(weights.read_bytes()).hexdigest()[:8]
        state = load_file(str(weights))
        self.modules: dict[str, BankModule] = {}
        for name in sorted(k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")):
            key = name + ".lora_A"
            gate = Gate(self.user_dim, s["n_meta"], s["gate_hidden"], s["temperature"])
            gate.load_state_dict({k[len(name) + 6:]: v for k, v in state.items() if k.startswith(name + ".gate.")})
            self.modules[name] = BankModule(state[key].float(), state[name + ".lora_B"].float(), gate.eval())
        cohorts = path / "cohorts.safetensors"
        self.centroids = load_file(str(cohorts)).get(f"c{n_cohorts}") if cohorts.exists() else None

    @torch.no_grad()
    def alphas(self, user: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: m.gate(user.float().unsqueeze(0))[0] for name, m in self.modules.items()}

    def flat(self, alphas: dict[str, torch.Tensor]) -> torch.Tensor:
        """All modules' weights in one vector, modules sorted by name (the space cohorts live in)."""
        return torch.cat([alphas[name] for name in self.modules])

    def unflat(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        n = next(iter(self.modules.values())).lora_a.shape[0]
        return {name: flat[i * n:(i + 1) * n] for i, name in enumerate(self.modules)}

    @torch.no_grad()
    def write(self, alphas: dict[str, torch.Tensor], out: Path, manifest: dict | None = None) -> Path:
        weights = {}
        for name, m in self.modules.items():
            a, b = mix(alphas[name].unsqueeze(0).float(), m.lora_a, m.lora_b)
            weights[name] = (a[0], b[0])
        return write_peft_adapter(out, weights, self.rank, self.alpha, self.base_model, manifest)

    def nearest_cohort(self, alphas: dict[str, torch.Tensor]) -> int:
        if self.centroids is None:
            raise NoCohorts(f"bank {self.name!r} has no cohorts of the configured size")
        return int(torch.cdist(self.flat(alphas).unsqueeze(0), self.centroids)[0].argmin())


GateInput = Callable[[UserContext], torch.Tensor]  # the user vector a bank's gates read


def din_gate(crm: DIN, vocab: Vocab) -> GateInput:
    """Banks trained on the DIN: its user vector of the request's history."""
    @torch.no_grad()
    def vector(context: UserContext) -> torch.Tensor:
        return crm.user_vector(encode_rows([(context.user_id, context.profile, context.behaviours, "", 0)],
                                           vocab))[0]
    return vector


def feature_gate(crm: Crm) -> GateInput:
    """Banks trained on the feature CRM: the user's side of the request's features, standardized as in training."""
    def vector(context: UserContext) -> torch.Tensor:
        if context.user_features is None:
            raise NoGateInput("no user features for the gate (the features stage did not run: no LOREC_CRM)")
        return torch.tensor(crm.user_vectors(np.asarray([context.user_features]))[0], dtype=torch.float32)
    return vector


class Personalizer:
    """Personal and cohort adapters for users, on disk under `cache_dir` (LRU-bounded)."""

    def __init__(self, bank: MetaBank, gate: GateInput, cache_dir: Path, refresh_events: int, cache_size: int,
                 needs_features: bool = False) -> None:
        self.bank, self.gate, self.needs_features = bank, gate, needs_features
        self.cache_dir = cache_dir
        self.refresh_events = refresh_events
        self.cache_size = cache_size
        self._lru: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(cache_dir.glob("p-*"), key=lambda p: p.stat().st_mtime):  # survive restarts
            self._lru[path.name] = path

    def user_alphas(self, context: UserContext) -> dict[str, torch.Tensor]:
        return self.bank.alphas(self.gate(context))

    def personal_name(self, user_id: str, history_size: int) -> str:
        digest = hashlib.sha1(user_id.encode()).hexdigest()[:16]
        return f"p-{self.bank.name}-{self.bank.version}-{digest}-v{history_size // self.refresh_events}"

    def cohort_name(self, cohort: int) -> str:
        return f"c-{self.bank.name}-{self.bank.version}-{len(self.bank.centroids)}-{cohort}"

    def personal(self, context: UserContext) -> tuple[str, Path, list[str]]:
        """(name, folder, evicted names): the user's adapter for this history, written if new."""
        name = self.personal_name(context.user_id, len(context.timeline))
        path = self.cache_dir / name
        if not path.exists():
            self.bank.write(self.user_alphas(context), path,
                            {"kind": "personal", "bank": self.bank.name, "history_size": len(context.timeline)})
        return name, path, self._touch(name, path)

    def cohorts(self) -> list[tuple[str, Path]]:
        """Every cohort adapter of the bank, written if missing."""
        if self.bank.centroids is None:
            return []
        out = []
        for i, centroid in enumerate(self.bank.centroids):
            name = self.cohort_name(i)
            path = self.cache_dir / name
            if not path.exists():
                self.bank.write(self.bank.unflat(centroid), path, {"kind": "cohort", "bank": self.bank.name})
            out.append((name, path))
        return out

    def cohort(self, context: UserContext) -> tuple[str, Path]:
        name = self.cohort_name(self.bank.nearest_cohort(self.user_alphas(context)))
        return name, self.cache_dir / name

    def _touch(self, name: str, path: Path) -> list[str]:
        with self._lock:
            self._lru[name] = path
            self._lru.move_to_end(name)
            evicted = []
            while len(self._lru) > self.cache_size:
                old, old_path = self._lru.popitem(last=False)
                _discard(old_path)
                evicted.append(old)
            return evicted


def bank_gate(data_dir: Path, bank: MetaBank) -> GateInput:
    """The gate input of the CRM a bank was trained on: a DIN file (`*.pt`) or a feature CRM artifact."""
    if bank.crm.endswith(".pt"):
        from service.din import load_crm

        return din_gate(*load_crm(DataPaths(data_dir).crm(bank.crm)))
    return feature_gate(Crm(crm_dir(data_dir, bank.crm)))


def open_personalizer(settings) -> Personalizer | None:
    """The deployment's personaliser: its bank, the CRM the bank was trained on, the adapter cache."""
    if settings.reclora_dir is None:
        return None
    bank = MetaBank(settings.reclora_dir, settings.adapters.cohorts)
    return Personalizer(bank, bank_gate(settings.data_dir, bank), settings.paths.personal,
                        settings.adapters.personal_refresh_events, settings.adapters.personal_cache_size,
                        needs_features=not bank.crm.endswith(".pt"))
