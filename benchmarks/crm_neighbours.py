"""A feature family's worth on test: two CRMs of one data folder (without and with it) on the same seeded
test samples as `lorec eval` (seed 0; ML-100K: the whole split), AUC / LogLoss / ACC overall and on cold
items and cold users, and the paired 95% bootstrap interval of the AUC gain.

Both CRMs were chosen on validation by `lorec train gbdt`; this scores each on test once. The co-rating
neighbour features (`--no-neighbours` for the base):

    LOREC_DATA_DIR=var/d1m .venv/bin/python benchmarks/crm_neighbours.py --data ../shared/data/ml-1m \
        --base gbdt-ml-1m-u2999-45e87834 --neighbours gbdt-ml-1m-u2999-78761601
        -> benchmarks/results/crm_neighbours.json (one entry per dataset)

The taste neighbour features (`--no-taste` for the base, the CRMs shipped until 2026-12-06):

    LOREC_DATA_DIR=var/d1m .venv/bin/python benchmarks/crm_neighbours.py --data ../shared/data/ml-1m \
        --base gbdt-ml-1m-u2999-78761601 --neighbours <the CRM with them> --out benchmarks/results/crm_taste.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import command, machine  # noqa: E402

from adapters.features import OfflineFeatures  # noqa: E402
from adapters.figures import COLD_ITEM, COLD_USER, paired_bootstrap  # noqa: E402
from adapters.offline import Dataset  # noqa: E402
from adapters.samples import draw  # noqa: E402
from adapters.train import metrics  # noqa: E402
from service.config import Settings  # noqa: E402
from service.crm import Crm, crm_dir  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "crm_neighbours.json"


def main(data: Path = typer.Option(..., help="a MovieLens folder"),
         base: str = typer.Option(..., help="the CRM without the feature family"),
         neighbours: str = typer.Option(..., help="the CRM with it"),
         n: int = typer.Option(10000), seed: int = typer.Option(0), out: Path = typer.Option(RESULTS)) -> None:
    started = time.monotonic()
    dataset = Dataset.read(data)
    samples = draw(dataset.parts["test"], n, seed)
    labels = np.array([s.label for s in samples])
    scores, counts = {}, None
    for name in (base, neighbours):
        crm = Crm(crm_dir(Settings().data_dir, name))
        features = OfflineFeatures(dataset.data, crm.spec).matrix(samples)
        scores[name] = 1 / (1 + np.exp(-crm.logits(features)))
        names = list(crm.spec.names)
        counts = features[:, names.index("u_n")], features[:, names.index("i_n")]
    u_n, i_n = counts
    slices = {"all": np.ones(len(samples), bool), "cold_items": i_n < COLD_ITEM, "cold_users": u_n < COLD_USER}
    report = {"dataset": dataset.name, "base": base, "neighbours": neighbours, "split": "test", "seed": seed}
    for slice_name, mask in slices.items():
        report[slice_name] = {"n": int(mask.sum()),
                              **{name: metrics(labels[mask].tolist(), scores[name][mask]) for name in scores},
                              "gain": paired_bootstrap(labels[mask], scores[base][mask], scores[neighbours][mask])}
    report.update(seconds=round(time.monotonic() - started), machine=machine(), command=command())
    results = json.loads(out.read_text()) if out.exists() else {}
    results[dataset.name] = report
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: report[k]["gain"] for k in slices}))


if __name__ == "__main__":
    typer.run(main)
