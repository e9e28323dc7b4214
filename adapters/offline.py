"""The gateway's stores read offline: the dataset a folder holds, the item index, and samples' prompts.

The trainer and the evaluator build prompts with the modules the gateway uses (`service.retrieval`,
`service.prompt`) over the gateway's own item index, so a sample's offline prompt is the served one.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapters.samples import PromptedSample, Sample, build_samples, draw, reit_prompts, split_by_time
from service.config import Settings
from service.ingest import MovieLens, read_movielens, require_store_holds
from service.prompt import PromptCodec, load_codec
from service.records import RetrievalMode
from service.retrieval import ItemIndex, open_configured_index, open_index


def dataset_name(data_name: str, directory: Path) -> str:
    """`ml-1m-u2999` for the users-1-2999 ratings file, else the format's name."""
    partial = any(directory.glob("ratings.users-1-2999.dat*")) and not any(directory.glob("ratings.dat*"))
    return f"{data_name}-u2999" if partial else data_name


@dataclass
class Dataset:
    """A MovieLens folder read and split by the ReLLa protocol."""

    data: MovieLens
    name: str  # dataset_name: what records and artifacts call it
    parts: dict[str, list[Sample]]

    @classmethod
    def read(cls, directory: Path) -> Dataset:
        data = read_movielens(directory)
        return cls(data, dataset_name(data.name, directory), split_by_time(build_samples(data)))

    def facts(self, n_train: int, k: int) -> dict:
        """What an adapter's manifest says of its data (a bundle carries the same)."""
        return {"dataset": self.name, "data_fingerprint": self.data.fingerprint,
                "split_sizes": {name: len(v) for name, v in self.parts.items()}, "n_train": n_train, "k": k}


@contextlib.asynccontextmanager
async def offline_index(settings: Settings, dataset: str) -> AsyncIterator[ItemIndex]:
    """The gateway's item index, for reading, once the store says it holds `dataset`. An embedded
    Qdrant Edge shard admits one process at a time, so the trainer reads a copy of it; a Qdrant
    server is shared as is."""
    await require_store_holds(settings, dataset)
    if settings.index.qdrant_url:
        index = open_configured_index(settings.index, settings.edge_path)
        try:
            yield index
        finally:
            await index.close()
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "shard"
        shutil.copytree(settings.edge_path, copy)
        index = open_index(None, None, settings.index.qdrant_collection, copy)
        try:
            yield index
        finally:
            await index.close()


@dataclass(frozen=True)
class CrmLogits:
    """The CRM's logits on a few-shot draw: out-of-fold on the train samples (the CRM saw them, so its own
    logits there are optimistic), its own on the validation samples, as the gateway computes them."""

    crm: str  # name@version
    train: list[float]
    valid: list[float]


CrmLogitsOf = Callable[["Dataset", list[Sample], list[Sample]], CrmLogits]


@dataclass
class FewShot:
    """A few-shot training pool (ReiT: each sample in both views) and its validation samples."""

    dataset: Dataset
    codec: PromptCodec
    train: list[PromptedSample]
    valid: list[PromptedSample]
    crm: str | None = None  # the CRM (name@version) whose logits are the prompts' offsets


async def few_shot_prompts(settings: Settings, directory: Path, n_train: int, n_valid: int, k: int,
                           seed: int, crm_logits: CrmLogitsOf | None = None, show_estimate: bool = False
                           ) -> FewShot:
    """`n_train` seeded train samples (recent-K and SUBR-K prompts) and `n_valid` validation samples (seed + 1,
    in the deployment's retrieval mode). With `crm_logits` each prompt carries its sample's CRM logit as
    `offset` (residual training), and with `show_estimate` its prompt shows the CRM's estimate."""
    dataset = Dataset.read(directory)
    codec = load_codec(settings.model_dir)
    train_samples = draw(dataset.parts["train"], n_train, seed)
    valid_samples = draw(dataset.parts["valid"], n_valid, seed + 1)
    logits = crm_logits(dataset, train_samples, valid_samples) if crm_logits else None
    async with offline_index(settings, dataset.data.name) as index:
        train = await reit_prompts(train_samples, dataset.data, index, codec, k,
                                   crm_logits=logits.train if logits else None, show_estimate=show_estimate)
        valid = await reit_prompts(valid_samples, dataset.data, index, codec, k,
                                   modes=(settings.requests.retrieval_mode,),
                                   crm_logits=logits.valid if logits else None, show_estimate=show_estimate)
    return FewShot(dataset, codec, train, valid, logits.crm if logits else None)


async def prompted(settings: Settings, data: MovieLens, samples: Sequence[Sample], k: int,
                   mode: RetrievalMode, crm_logits: Sequence[float] | None = None) -> list[PromptedSample]:
    """The samples' prompts in one retrieval mode, as the gateway writes them (with the CRM's estimate
    when `crm_logits` are given: an adapter trained to read it)."""
    async with offline_index(settings, data.name) as index:
        return await reit_prompts(samples, data, index, load_codec(settings.model_dir), k, modes=(mode,),
                                  crm_logits=crm_logits, show_estimate=crm_logits is not None)


def write_bundle(settings: Settings, directory: Path, n_train: int, n_valid: int, k: int, seed: int,
                 test_n: int, test_seed: int, out: Path) -> dict:
    """`lorec train prompts`: the few-shot pool, the validation samples and optionally `lorec eval`'s seeded
    test slice as token ids (adapters/bundle.py), to fit or score where the item index is not."""
    from adapters import bundle

    shots = asyncio.run(few_shot_prompts(settings, directory, n_train, n_valid, k, seed))
    rows = {"train": bundle.from_prompted(shots.train), "valid": bundle.from_prompted(shots.valid)}
    if test_n:  # the slice and prompts `lorec eval --n test_n --seed test_seed` scores offline
        test = draw(shots.dataset.parts["test"], test_n, test_seed)
        rows["test"] = bundle.from_prompted(asyncio.run(prompted(settings, shots.dataset.data, test, k,
                                                                 settings.requests.retrieval_mode)))
    codec = shots.codec
    meta = bundle.BundleMeta(**shots.dataset.facts(n_train, k), seed=seed, retrieval=settings.requests.retrieval_mode,
                             test_seed=test_seed, model=Path(settings.model_dir).name,
                             answer={"yes": codec.answer.yes, "no": codec.answer.no}, pad_id=codec.pad_id)
    bundle.save(out, bundle.Bundle(meta, rows))
    return {"bundle": str(out), **{p: len(r) for p, r in rows.items()},
            "tokens": sum(len(r.input_ids) for part in rows.values() for r in part)}


def split_sizes(directory: Path) -> dict:
    """`lorec train splits`: the ReLLa samples of a folder and the sizes of its 8:1:1 time split."""
    dataset = Dataset.read(directory)
    parts = dataset.parts
    return {"dataset": dataset.name, "ratings": len(dataset.data.ratings), **{k: len(v) for k, v in parts.items()},
            "positive_rate": {k: round(sum(s.label for s in v) / max(len(v), 1), 4) for k, v in parts.items()}}
