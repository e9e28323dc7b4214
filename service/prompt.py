"""The one prompt template, used by the gateway and the offline trainer alike.

Shape (ReLLa, as published): a short profile, the K behaviours as a numbered
list of "title (year), N stars" in time order, a note that more stars mean
more liking, then the question about the target and an instruction to answer
only Yes or No. The user's part comes first and the target's part last, so
every candidate of one request shares the longest possible prefix (vLLM's
prefix cache reuses it; in `recent` mode that is the whole history).

An adapter trained with the CRM's estimate in its prompt (its manifest's `prompt_crm`) gets one more
line in the target's part: the CRM's probability as a whole percent, the CoLLM/Few2Many idea of giving
the LLM what the conventional model knows. Trainer and gateway write it from the same CRM and the same
point-in-time features, so the tokens are the same.

Item text is data, not instructions: titles are quoted and stripped of
quotes and line breaks so a title cannot close the list or start a new line
of instructions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from service.records import Behaviour, Item, Profile

ANSWER_PREFIX = "Answer:"
YES, NO = " Yes", " No"
_UNSAFE = re.compile(r'[\x00-\x1f\x7f"]+')


def one_line(text: str) -> str:
    """Text without line breaks, control characters or double quotes."""
    return " ".join(_UNSAFE.sub(" ", text).split())


def quote(text: str) -> str:
    """Item text as a quoted literal on one line."""
    return '"' + one_line(text) + '"'


def item_phrase(item: Item) -> str:
    year = f" ({item.year})" if item.year else ""
    return f"{quote(item.title)}{year}"


def behaviour_phrase(behaviour: Behaviour, item: Item) -> str:
    if behaviour.rating is None:
        return f"{item_phrase(item)}, clicked"
    stars = f"{behaviour.rating:g}"
    return f"{item_phrase(item)}, {stars} star{'' if stars == '1' else 's'}"


def profile_sentence(profile: Profile) -> str:
    parts = []
    for name, value in (("gender", profile.gender), ("age", profile.age), ("occupation", profile.occupation)):
        text = one_line(value or "")
        if text:
            parts.append(f"{name}: {text}")
    if not parts:
        return "Nothing is known about the user's profile."
    return "The user's profile is " + "; ".join(parts) + "."


def user_part(profile: Profile, behaviours: Sequence[Behaviour], items: dict[str, Item]) -> str:
    """The shared head of the prompt: profile and history, oldest first."""
    lines = [profile_sentence(profile)]
    if behaviours:
        lines.append("The user watched and rated these movies, in time order:")
        lines += [f"{i}. {behaviour_phrase(b, items[b.item_id])}" for i, b in enumerate(behaviours, 1)]
        lines.append("More stars mean the user liked the movie more.")
    else:
        lines.append("The user has not rated any movie yet.")
    return "\n".join(lines) + "\n"


def estimate_sentence(crm_logit: float) -> str:
    """The CRM's estimate as the prompt shows it: its probability as a whole percent. Trainer and gateway
    pass the logit and this one function turns it into text, so both write the same number."""
    probability = 1 / (1 + math.exp(-crm_logit)) if crm_logit >= 0 else math.exp(crm_logit) / (1 + math.exp(crm_logit))
    percent = min(100, max(0, round(100 * probability)))
    return f"A recommender trained on all users' ratings gives a {percent}% chance that the user likes it.\n"


def target_part(target: Item, crm_logit: float | None = None) -> str:
    hint = "" if crm_logit is None else estimate_sentence(crm_logit)
    return (
        f"Will the user like the movie {item_phrase(target)}?\n{hint}"
        f"Answer only Yes or No.\n{ANSWER_PREFIX}"
    )


def build_prompt(profile: Profile, behaviours: Sequence[Behaviour], items: dict[str, Item], target: Item,
                 crm_logit: float | None = None) -> str:
    """Prompt text for one (user, target) pair; `behaviours` already chosen and in time order; `crm_logit`:
    the CRM's estimate, for an adapter trained to read it."""
    return user_part(profile, behaviours, items) + target_part(target, crm_logit)


@dataclass(frozen=True)
class AnswerTokens:
    yes: int
    no: int


class PromptCodec:
    """Turns prompt text into the token ids the engine (and the trainer) consume."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.answer = AnswerTokens(self._answer_token(YES), self._answer_token(NO))

    @property
    def pad_id(self) -> int:
        """Padding for batched offline scoring; any id works under the attention mask."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _answer_token(self, answer: str) -> int:
        # The answer token is what the tokenizer appends to the prompt's end,
        # whatever its vocabulary calls it (" Yes", "▁Yes", "ĠYes").
        head = self.tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(ANSWER_PREFIX + answer, add_special_tokens=False)["input_ids"]
        if full[: len(head)] != head or len(full) != len(head) + 1:
            raise ValueError(f"{answer!r} is not one token after {ANSWER_PREFIX!r} in this tokenizer")
        return full[-1]


class PromptTooLong(ValueError):
    """Even with no history the target's part does not fit the token budget."""


def encode_within_budget(codec: PromptCodec, profile: Profile, behaviours: Sequence[Behaviour],
                         items: dict[str, Item], target: Item, max_tokens: int, crm_logit: float | None = None
                         ) -> tuple[list[int], list[Behaviour]]:
    """Token ids of the prompt and the behaviours it shows, at most `max_tokens` long.

    The oldest behaviours are dropped first; the profile, the target and the question never are.
    """
    kept = list(behaviours)
    while True:
        ids = codec.encode(build_prompt(profile, kept, items, target, crm_logit))
        if len(ids) <= max_tokens:
            return ids, kept
        if not kept:
            raise PromptTooLong(f"the prompt for item {target.item_id} needs {len(ids)} tokens, "
                                f"more than the budget of {max_tokens}")
        kept = kept[1:]


def load_codec(model_dir) -> PromptCodec:
    from transformers import AutoTokenizer

    return PromptCodec(AutoTokenizer.from_pretrained(str(model_dir)))
