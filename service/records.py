"""Plain records that flow through the request stages (history -> retrieval -> prompt -> score)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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


@dataclass(slots=True)
class UserContext:
    """What the history stage hands on: the user's profile and time-ordered behaviours; the features
    stage adds the user's side of the features (what a RecLoRA bank gated on the feature CRM reads)."""

    user_id: str
    profile: Profile
    behaviours: list[Behaviour] = field(default_factory=list)
    user_features: list[float] | None = None  # features.FeatureSpec.user_names order
