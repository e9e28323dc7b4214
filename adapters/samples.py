"""Training samples (ReLLa protocol) built offline from the raw MovieLens files.

Each rating is a sample: label = rating > 3, history = every rating of that
user with a strictly earlier timestamp (the gateway's `as_of` rule), in the
order Redis keeps them, capped like the gateway's history read. The prompt
comes from the same modules the gateway uses (`service.retrieval` for the
behaviours, `service.prompt` for the text and token ids), so a sample scored
offline and the same sample scored through the gateway are the same tokens.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from service.history import time_order_key
from service.ingest import MovieLens
from service.prompt import PromptCodec, build_prompt
from service.records import Behaviour, Item, Profile
from service.retrieval import ItemIndex, Mode, select_behaviours

MIN_HISTORY = 5


@dataclass(frozen=True)
class Sample:
    user_id: str
    item_id: str
    ts: int
    label: int
    history: list[Behaviour]


def user_timelines(data: MovieLens) -> dict[str, list[Behaviour]]:
    timelines: dict[str, list[Behaviour]] = defaultdict(list)
    for user_id, behaviour in data.ratings:
        timelines[user_id].append(behaviour)
    for events in timelines.values():
        events.sort(key=time_order_key)
    return timelines


def history_before(timeline: list[Behaviour], ts: int, cap: int) -> list[Behaviour]:
    """Behaviours strictly before `ts`, the newest `cap` of them."""
    end = bisect.bisect_left([b.ts for b in timeline], ts)
    return timeline[max(0, end - cap):end]


def samples(data: MovieLens, cap: int = 5000, min_history: int = MIN_HISTORY) -> Iterator[Sample]:
    for user_id, timeline in user_timelines(data).items():
        for behaviour in timeline:
            history = history_before(timeline, behaviour.ts, cap)
            if len(history) >= min_history:
                yield Sample(user_id, behaviour.item_id, behaviour.ts, int((behaviour.rating or 0) > 3), history)


async def prompt_ids(sample: Sample, profile: Profile, catalog: dict[str, Item], index: ItemIndex,
                     codec: PromptCodec, k: int, mode: Mode) -> list[int]:
    chosen = (await select_behaviours(index, sample.history, [sample.item_id], k, mode))[sample.item_id]
    chosen = [b for b in chosen if b.item_id in catalog]
    return codec.encode(build_prompt(profile, chosen, catalog, catalog[sample.item_id]))
