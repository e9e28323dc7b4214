"""Recorded figures: `benchmarks/results/quality.json` as `{dataset: {method: {...}, ...}}`, and the command
line each figure came from."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def recorded_command() -> str:
    """The running `lorec ...` command line, as a record cites it."""
    return "lorec " + " ".join(sys.argv[1:])


def _update(path: Path, dataset: str, fields: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault(dataset, {}).update(fields)
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def record_result(path: Path, dataset: str, method: str, result: dict) -> None:
    """Merge one method's figures into the dataset's entry."""
    _update(path, dataset, {method: result})


def record_dataset_facts(path: Path, dataset: str, **facts) -> None:
    """Dataset-level entries beside the methods (e.g. served_default, served_vs_best_crm)."""
    _update(path, dataset, facts)
