"""Typed artifact manifests: what a trained artifact is, written beside it as `manifest.json`.

Each manifest class names its format and the version of that format it writes. Loading checks
both before anything else, so an artifact of another kind or of a format version this code does
not know is refused with a message saying which, instead of failing on a missing key hours later.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact that cannot be used: missing, of another format or version, or not matching its files."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


REPO = Path(__file__).resolve().parent.parent


def _git(*args: str, cwd: Path = REPO) -> str | None:
    """A git command's output, or None outside a checkout (an installed package, no git)."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=cwd).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str | None:
    out = _git("rev-parse", "HEAD")
    return out.strip() if out is not None else None


def code_version(repo: Path = REPO, folders: tuple[str, ...] = ("service", "adapters")) -> str | None:
    """The committed content of the code that computes scores (the git blobs of these folders' Python files):
    unlike the commit, it stays the same across commits of documents, results, tests or shipped models."""
    out = _git("ls-tree", "-r", "HEAD", *folders, cwd=repo)
    code = sorted(line for line in (out or "").splitlines() if line.endswith(".py"))
    return hashlib.sha256("\n".join(code).encode()).hexdigest()[:16] if code else None


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Manifest(BaseModel):
    """Base of every manifest: `format` and `format_version` first, then the artifact's own fields.

    A kind whose files predate the versioning (`LEGACY`) reads a file without `format` as version 1,
    keeping the fields it knows; a versioned file must match exactly."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    FILE: ClassVar[str] = MANIFEST
    LEGACY: ClassVar[bool] = False

    format: str
    format_version: int
    created: str = Field(default_factory=utc_now)
    git_commit: str | None = Field(default_factory=git_commit)

    @classmethod
    def new(cls, **fields) -> Self:
        return cls(format=cls.FORMAT, format_version=cls.VERSION, **fields)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.FILE
        tmp = path.with_name(f".{self.FILE}.{os.getpid()}.tmp")
        tmp.write_text(self.model_dump_json(indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: Path) -> Self:
        path = folder / cls.FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{folder}: no {cls.FILE} (not a {cls.FORMAT} artifact)") from None
        except json.JSONDecodeError as error:
            raise ArtifactError(f"{path}: not JSON ({error})") from None
        if cls.LEGACY and "format" not in raw:  # written before the format was named
            raw = {k: v for k, v in raw.items() if k in cls.model_fields}
            raw.update(format=cls.FORMAT, format_version=cls.VERSION)
        if raw.get("format") != cls.FORMAT:
            raise ArtifactError(f"{path}: a {raw.get('format')!r} artifact, not {cls.FORMAT!r}")
        if raw.get("format_version") != cls.VERSION:
            raise ArtifactError(f"{path}: {cls.FORMAT} format version {raw.get('format_version')!r}; this lorec "
                                f"reads version {cls.VERSION}: retrain it, or run the lorec that wrote it")
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise ArtifactError(f"{path}: {error}") from None


class AdapterManifest(Manifest):
    """What an adapter in the registry was trained on and how (written by `lorec train reit`; the
    gateway reads `prompt_crm` from it)."""

    FORMAT = "lorec.adapter"
    VERSION = 1
    LEGACY = True  # adapters exported before the format was named carry the same fields

    name: str
    base_model: str
    method: str = "reit"
    dataset: str | None = None
    data_fingerprint: str | None = None
    split_sizes: dict[str, int] | None = None
    n_train_samples: int | None = None
    n_train_prompts: int | None = None
    n_valid: int | None = None
    k: int | None = None
    lora: dict | None = None
    loss: str | None = None
    lr: dict | None = None
    validation: dict | None = None  # the best validation evaluation, which chose the checkpoint
    train_seconds: float | None = None
    steps: int | None = None
    epochs: float | None = None
    device: str | None = None
    stopped: str | None = None
    dtype: str | None = None
    offset_crm: str | None = None  # residual training: the CRM (name@version) it learned on top of
    prompt_crm: str | None = None  # the CRM (name@version) whose estimate its prompts show (service.prompt)
    command: str | None = None


class DataPaths:
    """Where each artifact lives under a data folder (LOREC_DATA_DIR): the one place that spells the layout."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def adapters(self) -> Path:
        """The adapter registry (LOREC_ADAPTER_DIR may move it elsewhere)."""
        return self.root / "adapters"

    def crm(self, name: str) -> Path:
        """A CRM: a feature CRM artifact folder, or a DIN file (`<dataset>-din.pt`)."""
        return self.root / "crm" / name

    def combiner(self, name: str) -> Path:
        return self.root / "combiners" / name

    def bank(self, name: str) -> Path:
        """A RecLoRA bank (`lorec train reclora`)."""
        return self.root / "reclora" / name

    def run(self, name: str) -> Path:
        """A training run's checkpoints (resumable)."""
        return self.root / "runs" / name

    @property
    def personal(self) -> Path:
        """The LRU cache of users' and cohorts' adapters."""
        return self.root / "personal"
