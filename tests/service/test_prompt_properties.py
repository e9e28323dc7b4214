"""Property tests (hypothesis) of the prompt builder and its token budget, over arbitrary item text."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.prompt import ANSWER_PREFIX, PromptTooLong, build_prompt, encode_within_budget, load_codec, quote
from service.records import Behaviour, Item, Profile

text = st.text(min_size=1, max_size=60)
items = st.builds(Item, item_id=st.uuids().map(str), title=text, year=st.one_of(st.none(), st.integers(1900, 2030)),
                  genres=st.just(()))
profiles = st.builds(Profile, gender=st.one_of(st.none(), text), age=st.one_of(st.none(), st.sampled_from(["18-24"])),
                     occupation=st.one_of(st.none(), text))
ratings = st.one_of(st.none(), st.integers(1, 5).map(float))


@pytest.fixture(scope="module")
def codec(tiny_model):
    return load_codec(tiny_model)


def history(catalog: list[Item], stars: list[float | None]) -> list[Behaviour]:
    return [Behaviour(item_id=i.item_id, ts=n, rating=r) for n, (i, r) in enumerate(zip(catalog, stars))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(profile=profiles, catalog=st.lists(items, max_size=12, unique_by=lambda i: i.item_id),
       stars=st.lists(ratings, min_size=12, max_size=12), target=items)
def test_item_text_never_adds_a_line_or_closes_its_quotes(codec, profile, catalog, stars, target):
    behaviours = history(catalog, stars)
    prompt = build_prompt(profile, behaviours, {i.item_id: i for i in catalog}, target)
    lines = prompt.split("\n")
    # profile, (header, one per behaviour, footer) or "no history", question, instruction, answer prefix
    assert len(lines) == 1 + (len(behaviours) + 2 if behaviours else 1) + 3
    assert lines[-1] == ANSWER_PREFIX and lines[-2] == "Answer only Yes or No."
    assert lines[-3] == f"Will the user like the movie {quote(target.title)}" + \
        (f" ({target.year})" if target.year else "") + "?"
    assert quote(target.title).count('"') == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(profile=profiles, catalog=st.lists(items, max_size=30, unique_by=lambda i: i.item_id),
       stars=st.lists(ratings, min_size=30, max_size=30), target=items, budget=st.integers(20, 600))
def test_budget_keeps_the_newest_behaviours_that_fit(codec, profile, catalog, stars, target, budget):
    behaviours = history(catalog, stars)
    by_id = {i.item_id: i for i in catalog}
    try:
        ids, kept = encode_within_budget(codec, profile, behaviours, by_id, target, budget)
    except PromptTooLong:
        assert len(codec.encode(build_prompt(profile, [], by_id, target))) > budget
        return
    assert len(ids) <= budget
    assert kept == behaviours[len(behaviours) - len(kept):], "a suffix: the oldest go first"
    assert ids == codec.encode(build_prompt(profile, kept, by_id, target))
    if len(kept) < len(behaviours):  # one more (older) behaviour would not have fitted
        one_more = behaviours[len(behaviours) - len(kept) - 1:]
        assert len(codec.encode(build_prompt(profile, one_more, by_id, target))) > budget
