"""RecLoRA: a bank of meta-LoRAs per adapted module, mixed per user by a gate over the CRM user vector.

Each adapted linear layer (q_proj and v_proj by default) keeps its frozen
weight W and gains N meta-LoRAs (A_k: r x in, B_k: out x r) and a gate
(LayerNorm -> Linear -> ReLU -> Linear -> softmax(/ temperature)) that reads
the frozen CRM's user vector u and gives alpha(u) over the bank. The user's
adapter is A_u = sum_k alpha_k A_k, B_u = sum_k alpha_k B_k, and the layer
computes W x + (lora_alpha / r) * B_u A_u x: an ordinary rank-r LoRA, which
`materialize` writes as a PEFT folder vLLM serves (and caches under a name).

The LLM sees only the few-shot ReiT samples; the CRM, trained on all of train,
is frozen and only supplies u (long-short modality, Few2Many).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from service.artifacts import DataPaths
from service.personalize import BankManifest, Gate, mix, write_peft_adapter


@dataclass
class BankSettings:
    n_meta: int = 8
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    gate_hidden: int = 64
    temperature: float = 1.0


class MetaLoraLinear(nn.Module):
    """A frozen linear layer plus a meta-LoRA bank mixed by `self.alpha` (batch, n_meta), set per batch."""

    def __init__(self, base: nn.Linear, user_dim: int, settings: BankSettings) -> None:
        super().__init__()
        self.base = base
        n, r = settings.n_meta, settings.rank
        self.lora_A = nn.Parameter(torch.empty(n, r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(n, base.out_features, r))  # zero: training starts at the base model
        for k in range(n):  # PEFT's LoRA init for A
            nn.init.kaiming_uniform_(self.lora_A.data[k], a=math.sqrt(5))
        self.gate = Gate(user_dim, n, settings.gate_hidden, settings.temperature)
        self.scaling = settings.alpha / r
        self.dropout = nn.Dropout(settings.dropout)
        self.alpha: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.alpha is None:
            return out
        a, b = mix(self.alpha, self.lora_A, self.lora_B)
        h = torch.einsum("bti,bri->btr", self.dropout(x).to(a.dtype), a)
        return out + (self.scaling * torch.einsum("btr,bor->bto", h, b)).to(out.dtype)


class RecLoRA(nn.Module):
    """The base causal LM with every target linear replaced by a MetaLoraLinear; only banks and gates train."""

    def __init__(self, model: nn.Module, user_dim: int, settings: BankSettings) -> None:
        super().__init__()
        self.model = model
        self.settings = settings
        self.user_dim = user_dim
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: dict[str, MetaLoraLinear] = {}
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in settings.target_modules and isinstance(module, nn.Linear):
                parent, attr = name.rsplit(".", 1)
                layer = MetaLoraLinear(module, user_dim, settings)
                setattr(model.get_submodule(parent), attr, layer)
                self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"no linear layer named {settings.target_modules} in the model")
        self.config = model.config

    def set_users(self, users: torch.Tensor | None) -> None:
        """Gate every module on the batch's user vectors (None: the plain base model)."""
        for layer in self.layers.values():
            layer.alpha = None if users is None else layer.gate(users.float())

    # The trainer's answer_logits reads these off the model it is given.
    def get_base_model(self) -> nn.Module:
        return self.model

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def save_pretrained(self, path: str) -> None:  # what the trainer's run directory calls
        self.save(Path(path))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": value for name, layer in self.layers.items()
                for key, value in layer.state_dict().items() if not key.startswith("base.")}

    def save(self, path: Path, extra: dict | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.trainable_state().items()},
                  str(path / "reclora.safetensors"))
        BankManifest.new(settings=asdict(self.settings), user_dim=self.user_dim, **(extra or {})).save(path)


def load_reclora(model_dir: Path, bank_dir: Path | None = None, settings: BankSettings | None = None,
                 user_dim: int | None = None, dtype: torch.dtype = torch.bfloat16) -> RecLoRA:
    """A fresh RecLoRA model (settings, user_dim) or a saved bank (bank_dir) on the base model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if bank_dir is not None:
        meta = BankManifest.load(bank_dir)
        settings = BankSettings(**{**meta.settings, "target_modules": tuple(meta.settings["target_modules"])})
        user_dim = meta.user_dim
    model = RecLoRA(base, user_dim, settings)
    if bank_dir is not None:
        state = load_file(str(bank_dir / "reclora.safetensors"))
        for name, layer in model.layers.items():
            layer.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")},
                                  strict=False)
    return model


def materialize(model: RecLoRA, user: torch.Tensor, out: Path, base_model: str,
                manifest: dict | None = None) -> Path:
    """Write one user's adapter (A_u, B_u per module) as a plain PEFT LoRA folder."""
    with torch.no_grad():
        weights = {}
        for name, layer in model.layers.items():
            a, b = mix(layer.gate(user.float().unsqueeze(0)), layer.lora_A, layer.lora_B)
            weights[name] = (a[0], b[0])
    return write_peft_adapter(out, weights, model.settings.rank, model.settings.alpha, base_model, manifest)


@torch.no_grad()
def cohort_centroids(model: RecLoRA, users: torch.Tensor, n_cohorts: int, seed: int = 0) -> torch.Tensor:
    """k-means over users' mixing weights (all modules, sorted by name, as the gateway's MetaBank
    flattens them): (n_cohorts, modules * n_meta)."""
    from sklearn.cluster import KMeans

    flat = torch.cat([model.layers[name].gate(users.float()) for name in sorted(model.layers)], -1)
    n_cohorts = min(n_cohorts, len(flat))
    km = KMeans(n_clusters=n_cohorts, n_init=4, random_state=seed).fit(flat.numpy())
    return torch.from_numpy(km.cluster_centers_).float()


def save_cohorts(bank_dir: Path, centroids: dict[int, torch.Tensor]) -> None:
    """Centroids per cohort count C, keyed `c<C>` (the gateway serves one C, LOREC_COHORTS)."""
    save_file({f"c{c}": t.contiguous() for c, t in centroids.items()}, str(bank_dir / "cohorts.safetensors"))


def user_vectors(crm, samples: Sequence, data, vocab) -> torch.Tensor:
    """The frozen DIN's user vector for each sample, from the history before the sample."""
    from adapters.crm import encode

    return crm.user_vector(encode(samples, data, vocab)).float()


def gate_vectors(data_dir: Path, crm_ref: str, samples: Sequence, data) -> torch.Tensor:
    """What a bank's gates read for each sample, as the gateway computes it (personalize.bank_gate): the DIN's
    user vector for a DIN file (`*.pt`), else the feature CRM's standardized user side of the features."""
    if crm_ref.endswith(".pt"):
        from service.din import load_crm

        crm, vocab = load_crm(DataPaths(data_dir).crm(crm_ref))
        return user_vectors(crm, samples, data, vocab)
    from adapters.features import OfflineFeatures
    from service.crm import Crm, crm_dir

    crm = Crm(crm_dir(data_dir, crm_ref))
    return torch.tensor(crm.user_vectors(OfflineFeatures(data, crm.spec).user_matrix(samples)), dtype=torch.float32)


def train_reclora(model_dir: Path, train: Sequence, valid: Sequence, users: torch.Tensor, answer, pad_id: int,
                  run_dir: Path, settings, bank: BankSettings) -> dict:
    """Train banks and gates on ReiT prompts; `users` holds one CRM vector per train row, then per valid row."""
    from adapters.train import fit, training_dtype

    def load(resume: Path | None) -> RecLoRA:
        return load_reclora(model_dir, bank_dir=resume, settings=bank, user_dim=users.shape[1],
                            dtype=training_dtype(settings.device, settings.dtype))

    def prepare(model: RecLoRA, rows: Sequence[int]) -> None:
        model.set_users(users[list(rows)])

    return fit(load, train, valid, answer, pad_id, run_dir, settings, prepare)
