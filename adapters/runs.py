"""A training run's directory: the latest state to resume from, the best checkpoint by validation AUC, and
`state.json` (`RunState`), a typed artifact with its own format version."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch


class UnknownRunFormat(ValueError):
    """A run directory written by another format (version) of the trainer."""


@dataclass
class RunState:
    """What a run directory's `state.json` holds: where training stands, every validation, the best one."""

    FORMAT: ClassVar[str] = "lorec.run"
    VERSION: ClassVar[int] = 1

    settings: dict  # the TrainSettings it was started with (as a dict)
    n_train: int
    n_valid: int
    step: int = 0
    best: dict | None = None  # {"step", "auc", "logloss", "acc", "n"} of the best validation
    evals: list[dict] = field(default_factory=list)
    stale: int = 0  # scheduled evaluations since the best one
    seconds: float = 0.0  # training time so far, across resumes
    done: bool = False
    stopped: str | None = None  # "patience", "time" or None (ran to the end)

    def to_json(self) -> str:
        return json.dumps({"format": self.FORMAT, "format_version": self.VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: Path) -> RunState:
        raw = json.loads(text)
        # Runs written before the format was named carry the same fields: they read as version 1.
        found = (raw.pop("format", cls.FORMAT), raw.pop("format_version", cls.VERSION))
        if found != (cls.FORMAT, cls.VERSION):
            raise UnknownRunFormat(f"{where}: a {found[0]!r} version {found[1]!r} run; this trainer reads "
                                   f"{cls.FORMAT!r} version {cls.VERSION}: train it again, or use the lorec that "
                                   "wrote it")
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UnknownRunFormat(f"{where}: unknown run state fields {sorted(unknown)}")
        return cls(**raw)

    def epochs(self) -> float:
        """Epochs of training behind the best checkpoint, not the run's last step."""
        return round(self.best["step"] * self.settings["batch_size"] / self.n_train, 3)


class Run:
    """The run directory: latest state for resuming, best adapter by validation AUC."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state_file = path / "state.json"

    def state(self) -> RunState | None:
        return RunState.from_json(self.state_file.read_text(), self.state_file) if self.state_file.exists() else None

    def save(self, model, optimizer, scheduler, state: RunState, best: bool) -> None:
        latest = self.path / "latest"
        tmp = self.path / "latest.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        shutil.rmtree(latest, ignore_errors=True)
        tmp.rename(latest)
        if best:
            shutil.rmtree(self.path / "best", ignore_errors=True)
            model.save_pretrained(str(self.path / "best"))
        tmp_state = self.state_file.with_suffix(".tmp")
        tmp_state.write_text(state.to_json())
        tmp_state.replace(self.state_file)
