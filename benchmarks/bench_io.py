"""What every benchmark records beside its figures: the machine and the command, and how it saves them."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import typer


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU"


def command() -> str:
    """The command line that is running, as the README writes it."""
    return f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])


def save(out: Path, report: dict, shown: dict | None = None) -> None:
    """Write `report` as JSON to `out` and print it (or the part of it in `shown`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    typer.echo(json.dumps(report if shown is None else shown, indent=1))
