"""ReLLa protocol on a small fixture: label rule, strictly-earlier histories, 8:1:1 time split, ReiT views."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from adapters.samples import build_samples, draw, label_of, reit_prompts, split_by_time
from service.ingest import MovieLens
from service.prompt import load_codec
from service.records import Behaviour, Item, Profile
from service.retrieval import open_index


def _fixture(n_users=12, per_user=30, seed=0) -> MovieLens:
    rng = random.Random(seed)
    items = [Item(str(i), f"Movie {i}", 1990 + i % 20, ("Drama",)) for i in range(60)]
    ratings = []
    for u in range(n_users):
        ts = 1_000_000 + u * 7
        for _ in range(per_user):
            ts += rng.choice([0, 0, 1, 60, 3600])  # same-second ties happen
            ratings.append((str(u), Behaviour(rng.choice(items).item_id, ts, float(rng.randint(1, 5)))))
    rng.shuffle(ratings)  # file order is not time order
    return MovieLens("fixture", items, {str(u): Profile("male", "30", "writer") for u in range(n_users)}, ratings)


def test_label_rule_and_min_history():
    assert [label_of(r) for r in (1, 2, 3, 3.5, 4, 5, None)] == [0, 0, 0, 1, 1, 1, 0]
    data = _fixture()
    samples = build_samples(data)
    assert samples and all(s.end >= 5 for s in samples)
    by_key = {(u, b.item_id, b.ts): b.rating for u, b in data.ratings}
    assert all(s.label == label_of(by_key[(s.user_id, s.item_id, s.ts)]) for s in samples)
    # Every rating with >= 5 strictly earlier ratings of its user is a sample, no other.
    expected = sum(1 for u, b in data.ratings if sum(1 for v, c in data.ratings if v == u and c.ts < b.ts) >= 5)
    assert len(samples) == expected


def test_no_history_holds_its_own_or_a_later_interaction():
    for s in build_samples(_fixture()):
        history = s.history()
        assert all(b.ts < s.ts for b in history)
        assert [b.ts for b in history] == sorted(b.ts for b in history)
        assert len(history) == sum(1 for b in s.timeline if b.ts < s.ts)


def test_split_is_8_1_1_by_global_time():
    samples = build_samples(_fixture(n_users=20))
    parts = split_by_time(samples)
    n = len(samples)
    assert [len(parts[p]) for p in ("train", "valid", "test")] == [n * 8 // 10, n * 9 // 10 - n * 8 // 10,
                                                                 n - n * 9 // 10]
    assert max(s.ts for s in parts["train"]) <= min(s.ts for s in parts["valid"])
    assert max(s.ts for s in parts["valid"]) <= min(s.ts for s in parts["test"])


def test_draw_is_seeded_and_in_time_order():
    pool = build_samples(_fixture())
    a, b, c = draw(pool, 25, 7), draw(pool, 25, 7), draw(pool, 25, 8)
    assert a == b and a != c and len(a) == 25
    assert [s.ts for s in a] == sorted(s.ts for s in a)


def test_reit_gives_each_sample_a_recent_and_a_subr_prompt(tiny_model):
    data = _fixture()
    codec = load_codec(tiny_model)
    picked = draw(build_samples(data), 6, 0)

    async def run():
        index = open_index(":memory:", None, "items", None)
        await index.ensure(8)
        await index.upsert([i.item_id for i in data.items],
                           np.random.default_rng(0).normal(size=(len(data.items), 8)).astype(np.float32))
        try:
            return await reit_prompts(picked, data, index, codec, k=4)
        finally:
            await index.close()

    prompts = asyncio.run(run())
    assert [(p.sample, p.mode) for p in prompts] == [(s, m) for s in picked for m in ("recent", "subr")]
    assert all(p.input_ids and p.input_ids[0] == codec.tokenizer.bos_token_id for p in prompts)
    assert any(a.input_ids != b.input_ids for a, b in zip(prompts[::2], prompts[1::2])), \
        "SUBR and recent views should differ for some sample"


def test_crm_logits_become_offsets_and_with_show_estimate_the_prompts_estimate(tiny_model):
    data = _fixture()
    codec = load_codec(tiny_model)
    picked = draw(build_samples(data), 3, 0)
    logits = [-1.0, 0.0, 2.0]

    async def run(**options):
        index = open_index(":memory:", None, "items", None)
        await index.ensure(8)
        await index.upsert([i.item_id for i in data.items], np.ones((len(data.items), 8), dtype=np.float32))
        try:
            return await reit_prompts(picked, data, index, codec, k=4, modes=("recent",), **options)
        finally:
            await index.close()

    plain = asyncio.run(run())
    offsets = asyncio.run(run(crm_logits=logits))
    shown = asyncio.run(run(crm_logits=logits, show_estimate=True))
    assert [p.offset for p in offsets] == [p.offset for p in shown] == logits and {p.offset for p in plain} == {0.0}
    assert [p.input_ids for p in offsets] == [p.input_ids for p in plain]  # residual prompts are ReLLa's
    texts = [codec.tokenizer.decode(p.input_ids) for p in shown]
    assert [t.split("gives a ")[1].split("%")[0] for t in texts] == ["27", "50", "88"]
    with pytest.raises(ValueError, match="one CRM logit per sample"):
        asyncio.run(run(crm_logits=logits[:2]))
    with pytest.raises(ValueError, match="one CRM logit per sample"):
        asyncio.run(run(show_estimate=True))
