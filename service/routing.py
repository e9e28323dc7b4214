"""Stage 4, adapter routing: which LoRA adapter (or the base model) scores a request.

Adapters live in a registry directory, one PEFT folder per adapter name
(`adapter_config.json` + `adapter_model.safetensors`). A new version of an
adapter gets a new name: vLLM keys its prefix cache by adapter name.
Names are plain tokens and paths never leave the registry root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BASE = "base"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterNotFound(LookupError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name


@dataclass(frozen=True)
class Route:
    adapter: str | None  # None: the base model
    path: Path | None = None

    @property
    def label(self) -> str:
        return self.adapter or BASE


class AdapterRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        if not _NAME.match(name) or ".." in name:
            raise AdapterNotFound(name, "not a valid adapter name")
        root = self.root.resolve()
        path = (root / name).resolve()
        if path.parent != root:  # a symlink pointing out of the registry
            raise AdapterNotFound(name, "outside the adapter registry")
        if not (path / "adapter_config.json").is_file():
            raise AdapterNotFound(name, "no such adapter in the registry")
        return path

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if self._servable(p.name))

    def _servable(self, name: str) -> bool:
        try:
            self.path(name)
        except AdapterNotFound:
            return False
        return True


def choose_route(requested: str | None, default: str | None, registry: AdapterRegistry) -> Route:
    """The request's own choice, else the deployment default, else the base model."""
    name = requested if requested is not None else default
    if name is None or name == BASE:
        return Route(adapter=None)
    return Route(adapter=name, path=registry.path(name))
