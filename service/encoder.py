"""Item vectors for SUBR: what Qdrant indexes.

Default (ReLLa's SUBR): the served LLM reads a short item description
(title, year, genres); its final hidden states are mean-pooled over the
tokens and reduced by PCA (512 dimensions, or fewer when there are fewer
items or hidden units); search uses cosine similarity. The PCA is fitted once
on the catalog at ingestion and stored, so a later item upsert lands in the
same space. Any other encoder plugs in through `LOREC_ENCODER=module:factory`,
a callable taking the settings and returning an object with `fit(texts)` and
`encode(texts)`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class EncoderNotReady(LookupError):
    """Item vectors need the PCA fitted on a first catalog (ingestion)."""


class ItemEncoder(Protocol):
    def fit(self, texts: list[str]) -> np.ndarray:
        """Encode the whole catalog, (re)fitting any learned reduction; returns the vectors."""

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode a few items in the space of the last fit."""


@dataclass
class Pca:
    mean: np.ndarray
    components: np.ndarray  # (dim, hidden)

    @classmethod
    def fit(cls, x: np.ndarray, dim: int) -> Pca:
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        return cls(mean=mean, components=vt[: min(dim, vt.shape[0])])

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) @ self.components.T).astype(np.float32)

    def save(self, path: Path, source: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, mean=self.mean, components=self.components, source=json.dumps(source))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, source: str) -> Pca | None:
        if not path.exists():
            return None
        data = np.load(path)
        if json.loads(str(data["source"])) != source:  # fitted for another model
            return None
        return cls(mean=data["mean"], components=data["components"])


class LLMEncoder:
    """Mean-pooled final hidden states of a causal LM, then PCA."""

    def __init__(self, model_dir: Path, pca_path: Path, dim: int = 512, batch_size: int = 32) -> None:
        self.model_dir = Path(model_dir)
        self.pca_path = pca_path
        self.dim = dim
        self.batch_size = batch_size
        self._model = None
        self._tokenizer = None
        self.pca = Pca.load(pca_path, str(self.model_dir.resolve()))

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
            self._model = AutoModel.from_pretrained(str(self.model_dir), dtype=torch.float32).eval()
        return self._model, self._tokenizer

    def hidden_states(self, texts: list[str], progress: bool = False) -> np.ndarray:
        import torch
        from tqdm import tqdm

        model, tokenizer = self._load()
        out = []
        batches = range(0, len(texts), self.batch_size)
        for start in tqdm(batches, desc="encoding items", unit="batch", disable=not progress):
            batch = tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True)
            with torch.inference_mode():
                last = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(last.dtype)
            out.append(((last * mask).sum(1) / mask.sum(1)).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def fit(self, texts: list[str]) -> np.ndarray:
        hidden = self.hidden_states(texts, progress=True)
        self.pca = Pca.fit(hidden, self.dim)
        self.pca.save(self.pca_path, str(self.model_dir.resolve()))
        return self.pca.transform(hidden)

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.pca is None:
            raise EncoderNotReady("the item encoder has not been fitted: ingest a catalog first")
        return self.pca.transform(self.hidden_states(texts))


def build_encoder(spec: str, model_dir: Path, data_dir: Path, dim: int):
    if spec == "llm":
        return LLMEncoder(model_dir, data_dir / "encoder" / "pca.npz", dim=dim)
    module, _, factory = spec.partition(":")
    return getattr(importlib.import_module(module), factory)(model_dir=model_dir, data_dir=data_dir, dim=dim)
