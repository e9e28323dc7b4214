"""Training and evaluation samples (ReLLa protocol) built offline from the raw MovieLens files.

Each rating is a sample: label = rating > 3; its history is every rating of
that user with a strictly earlier timestamp (the gateway's `as_of` rule), in
the order Redis keeps them, capped like the gateway's history read. Samples
with fewer than 5 earlier ratings are dropped; the rest are sorted by time and
split 8:1:1 by global time. A sample keeps an index into its user's timeline,
not a copy of the history, so ML-1M's half-million samples fit in memory.

Prompts come from the modules the gateway uses (`service.retrieval` chooses
the behaviours, `service.prompt` writes text and token ids): a sample scored
offline and the same sample scored through the gateway are the same tokens.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from service.history import time_order_key
from service.ingest import MovieLens
from service.prompt import PromptCodec, build_prompt
from service.records import Behaviour, Item, Profile, RetrievalMode
from service.retrieval import ItemIndex, select_behaviours

MIN_HISTORY = 5
SPLIT_RATIOS = (8, 1, 1)
HISTORY_CAP = 5000  # the gateway's default LOREC_MAX_HISTORY_EVENTS


@dataclass(frozen=True, slots=True)
class Sample:
    user_id: str
    item_id: str
    ts: int
    label: int
    timeline: Sequence[Behaviour]  # the user's whole timeline, shared between samples
    end: int  # history = timeline[:end], every behaviour strictly before ts

    def history(self, cap: int = HISTORY_CAP) -> list[Behaviour]:
        return list(self.timeline[max(0, self.end - cap):self.end])


def user_timelines(data: MovieLens) -> dict[str, list[Behaviour]]:
    timelines: dict[str, list[Behaviour]] = defaultdict(list)
    for user_id, behaviour in data.ratings:
        timelines[user_id].append(behaviour)
    for events in timelines.values():
        events.sort(key=time_order_key)
    return dict(timelines)


def label_of(rating: float | None) -> int:
    return int(rating is not None and rating > 3)


def build_samples(data: MovieLens, min_history: int = MIN_HISTORY) -> list[Sample]:
    """Every rating with at least `min_history` strictly earlier ratings, sorted by global time."""
    out = []
    for user_id, timeline in user_timelines(data).items():
        times = [b.ts for b in timeline]
        for behaviour in timeline:
            end = bisect.bisect_left(times, behaviour.ts)  # ties with ts are not history
            if end >= min_history:
                out.append(Sample(user_id, behaviour.item_id, behaviour.ts, label_of(behaviour.rating),
                                  timeline, end))
    out.sort(key=lambda s: (s.ts, s.user_id, s.item_id))
    return out


def split_by_time(samples: Sequence[Sample], ratios: tuple[int, int, int] = SPLIT_RATIOS) -> dict[str, list[Sample]]:
    """Train / valid / test by global time (input sorted by time), 8:1:1 by default."""
    total = sum(ratios)
    train_end = len(samples) * ratios[0] // total
    valid_end = len(samples) * (ratios[0] + ratios[1]) // total
    return {"train": list(samples[:train_end]), "valid": list(samples[train_end:valid_end]),
            "test": list(samples[valid_end:])}


def draw(pool: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """A fixed, seeded subset (few-shot training pools, evaluation slices), in time order."""
    if n >= len(pool):
        return list(pool)
    chosen = random.Random(seed).sample(range(len(pool)), n)
    return [pool[i] for i in sorted(chosen)]


@dataclass(frozen=True, slots=True)
class PromptedSample:
    sample: Sample
    mode: RetrievalMode
    input_ids: list[int]
    offset: float = 0.0  # the CRM's logit of the sample, for residual training (train.answer_loss)

    @property
    def label(self) -> int:
        return self.sample.label


async def prompt_ids(sample: Sample, profile: Profile, catalog: dict[str, Item], index: ItemIndex,
                     codec: PromptCodec, k: int, mode: RetrievalMode, crm_logit: float | None = None) -> list[int]:
    chosen = (await select_behaviours(index, sample.history(), [sample.item_id], k, mode))[sample.item_id]
    chosen = [b for b in chosen if b.item_id in catalog]
    return codec.encode(build_prompt(profile, chosen, catalog, catalog[sample.item_id], crm_logit))


async def reit_prompts(samples: Sequence[Sample], data: MovieLens, index: ItemIndex, codec: PromptCodec,
                       k: int, modes: Sequence[RetrievalMode] = ("recent", "subr"),
                       crm_logits: Sequence[float] | None = None, show_estimate: bool = False
                       ) -> list[PromptedSample]:
    """ReiT: every sample once per history view (recent-K and SUBR-K by default). `crm_logits` (one per
    sample) become each prompt's `offset`, and with `show_estimate` the prompt shows their probability."""
    catalog = {i.item_id: i for i in data.items}
    logits = [0.0] * len(samples) if crm_logits is None else list(crm_logits)
    if len(logits) != len(samples) or (show_estimate and crm_logits is None):
        raise ValueError("one CRM logit per sample is needed")
    out = []
    for sample, logit in zip(samples, logits):
        profile = data.profiles.get(sample.user_id, Profile())
        shown = logit if show_estimate else None
        for mode in modes:
            ids = await prompt_ids(sample, profile, catalog, index, codec, k, mode, shown)
            out.append(PromptedSample(sample, mode, ids, offset=logit))
    return out
