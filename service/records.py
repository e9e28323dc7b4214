"""Plain records that flow through the request stages (history -> retrieval -> prompt -> score)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# The vocabularies of the request, defined once: settings, wire schemas and modules import them.
RetrievalMode = Literal["subr", "recent", "slate"]  # which past behaviours each prompt shows
AdapterMode = Literal["personal", "cohort", "shared", "base"]  # which LoRA adapter scores
RouteMode = Literal["personal", "cohort", "shared", "base", "named", "crm", "none"]  # what served (responses)
Scorer = Literal["hybrid", "llm", "crm"]  # who scores


@dataclass(frozen=True, slots=True)
class Behaviour:
    """One past behaviour of a user: a rating (1-5) or a click (rating None)."""

    item_id: str
    ts: int
    rating: float | None = None


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    title: str
    year: int | None = None
    genres: tuple[str, ...] = ()

    def description(self) -> str:
        """What the item encoder reads (ReLLa's SUBR: title and genre)."""
        year = f" ({self.year})" if self.year else ""
        genres = f"; genres: {', '.join(self.genres)}" if self.genres else ""
        return f"{self.title}{year}{genres}"


@dataclass(frozen=True, slots=True)
class Profile:
    gender: str | None = None
    age: str | None = None
    occupation: str | None = None


@dataclass(frozen=True, eq=False)  # compared by identity: equal arrays have no single truth value
class Timeline:
    """A user's behaviours in time order, as columns: what the features stage computes over (a request's
    2,000 events as objects had cost ~2 ms to build and read back here). `behaviours()` gives the objects,
    for the stages that show or search them (retrieval, prompt)."""

    item_ids: Sequence[str]  # a list, or the bytes they were read in (item_ids.EncodedIds)
    ts: np.ndarray  # int64 seconds
    ratings: np.ndarray  # float64, NaN for a click

    @classmethod
    def of(cls, behaviours: Sequence[Behaviour]) -> Timeline:
        return cls([b.item_id for b in behaviours], np.array([b.ts for b in behaviours], dtype=np.int64),
                   np.array([np.nan if b.rating is None else b.rating for b in behaviours], dtype=np.float64))

    def __len__(self) -> int:
        return len(self.item_ids)

    def tail(self, n: int) -> Timeline:
        """The newest `n` behaviours."""
        start = max(0, len(self) - n)
        return Timeline(self.item_ids[start:], self.ts[start:], self.ratings[start:])

    def behaviours(self) -> list[Behaviour]:
        return [Behaviour(item_id, ts, None if rating != rating else rating)  # NaN != NaN: a click
                for item_id, ts, rating in zip(self.item_ids, self.ts.tolist(), self.ratings.tolist())]


NO_BEHAVIOURS = Timeline([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))


@dataclass(slots=True)
class UserContext:
    """What the history stage hands on: the user's profile and time-ordered behaviours; the features
    stage adds the user's side of the features (what a RecLoRA bank gated on the feature CRM reads)."""

    user_id: str
    profile: Profile
    timeline: Timeline = NO_BEHAVIOURS
    user_features: list[float] | None = None  # features.FeatureSpec.user_names order
    _behaviours: list[Behaviour] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, user_id: str, profile: Profile, behaviours: Sequence[Behaviour]) -> UserContext:
        return cls(user_id, profile, Timeline.of(behaviours))

    @property
    def behaviours(self) -> list[Behaviour]:
        """The timeline as objects, built on first use: a request the CRM alone answers never needs them."""
        if self._behaviours is None:
            self._behaviours = self.timeline.behaviours()
        return self._behaviours
