"""The DIN baseline trains on ReLLa-protocol samples, learns signal, and exposes a user vector."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.crm import LONG_HISTORY, Vocab, encode, predict, train_din
from adapters.gbdt import publish
from adapters.samples import build_samples, split_by_time
from service.ingest import read_movielens
from tests.utils.stack import ML100K


@pytest.mark.slow  # trains a DIN on 20,000 samples
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


@pytest.mark.slow  # trains a DIN, runs the lorec command
def test_lorec_eval_crm_scores_the_llm_rows_samples(tmp_path):
    """`lorec eval --crm` scores the saved CRM on the same seeded slice the LLM rows use."""
    import json
    import os
    import subprocess

    from adapters.samples import draw
    from adapters.train import metrics
    from service.din import save_crm
    from tests.utils.stack import LOREC

    data = read_movielens(ML100K)
    parts = split_by_time(build_samples(data))
    vocab = Vocab.of(data)
    model, _ = train_din(encode(parts["train"][-5_000:], data, vocab), encode(parts["valid"][:500], data, vocab),
                         vocab, epochs=1)
    save_crm(model, vocab, tmp_path / "data" / "crm" / "ml-100k-din.pt")
    out = tmp_path / "quality.json"
    done = subprocess.run([LOREC, "eval", "--dir", str(ML100K), "--crm", "--n", "300", "--method", "crm-din-slice",
                           "--out", str(out)], env={**os.environ, "LOREC_DATA_DIR": str(tmp_path / "data")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads(out.read_text())["ml-100k"]["crm-din-slice"]
    sliced = draw(parts["test"], 300, 0)
    expected = metrics([s.label for s in sliced], predict(model, encode(sliced, data, vocab)))
    assert recorded["kind"] == "crm" and recorded["n_test"] == 300
    assert recorded["auc"] == pytest.approx(expected["auc"], abs=1e-9)


def test_a_retrained_crm_never_overwrites_the_one_of_its_name(tmp_path):
    served = tmp_path / "crm" / "gbdt-x"
    served.mkdir(parents=True)
    (served / "model.txt").write_text("served")
    first = tmp_path / "crm" / ".staging-a"
    first.mkdir()
    (first / "model.txt").write_text("retrained")
    with pytest.raises(FileExistsError, match="gbdt-x"):
        publish(first, served)
    assert (served / "model.txt").read_text() == "served" and not first.exists()
    assert publish(served, tmp_path / "crm" / "gbdt-y") == tmp_path / "crm" / "gbdt-y"
