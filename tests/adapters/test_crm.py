"""The DIN baseline trains on ReLLa-protocol samples, learns signal, and exposes a user vector."""

from __future__ import annotations

import numpy as np

from adapters.crm import LONG_HISTORY, Vocab, encode, predict, train_din
from adapters.samples import build_samples, split_by_time
from service.ingest import read_movielens
from tests.conftest import ML100K


def test_din_beats_chance_on_ml100k_slice():
    data = read_movielens(ML100K)
    parts = split_by_time(build_samples(data))
    vocab = Vocab.of(data)
    train = encode(parts["train"][-20_000:], data, vocab)
    valid = encode(parts["valid"][:3000], data, vocab)
    assert train.history.shape == (20_000, LONG_HISTORY)
    # Histories are left-aligned to the target: the newest behaviour sits in the last column.
    s = parts["train"][-1]
    assert train.history[-1, -1].item() == vocab.items[s.history()[-1].item_id]
    model, report = train_din(train, valid, vocab, epochs=2)
    assert report["valid"]["auc"] > 0.6
    scores = predict(model, valid)
    assert scores.shape == (3000,) and np.all((scores > 0) & (scores < 1))
    vectors = model.user_vector(valid)
    assert vectors.shape == (3000, 64) and bool(vectors.abs().sum(1).gt(0).all())
