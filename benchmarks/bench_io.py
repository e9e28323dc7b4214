"""What every benchmark records beside its figures: the machine and the command, and how it saves them."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import typer


def machine() -> str:
    """The CPU as the figures depend on it: machines of the same kind here came with AVX2 only or with AVX-512."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_isa()}), no GPU"


def cpu_isa() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown ISA"
    fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    flags = [f for f in wanted if f in fields.get("flags", "").split()]
    return f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')}: {' '.join(flags)}"


def command() -> str:
    """The command line that is running, as the README writes it."""
    return f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])


def save(out: Path, report: dict, shown: dict | None = None) -> None:
    """Write `report` as JSON to `out` and print it (or the part of it in `shown`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    typer.echo(json.dumps(report if shown is None else shown, indent=1))
