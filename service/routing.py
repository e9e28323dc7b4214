"""Stage 5, adapter routing: which LoRA adapter (or the base model) scores a request.

Adapters live in a registry directory, one PEFT folder per adapter name
(`adapter_config.json` + `adapter_model.safetensors`). A new version of an
adapter gets a new name: vLLM keys its prefix cache by adapter name.
Names are plain tokens and paths never leave the registry root.

Modes, per deployment and per request: `personal` (the user's RecLoRA adapter,
see personalize.py), `cohort` (the nearest cohort's), `shared` (the
deployment's default adapter, e.g. ReiT), `base`. When a mode's adapter cannot
be had or fails to load, the next one in that order serves, the response says
which and why, and an adapter that failed to load is quarantined (not retried).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from service.artifacts import MANIFEST, AdapterManifest, ArtifactError, sha256_of
from service.records import AdapterMode, RouteMode, UserContext
from service.scoring import AdapterLoadFailed, EnginePool

log = logging.getLogger(__name__)
CHAIN: tuple[AdapterMode, ...] = ("personal", "cohort", "shared", "base")

BASE = "base"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModeUnavailable(Exception):
    """An adapter mode that cannot serve this request (the next mode of the chain does). Only these, and the
    engine refusing an adapter, move the chain on: any other exception is a bug and surfaces as one."""


class NoSharedAdapter(ModeUnavailable):
    pass


class NoBank(ModeUnavailable):
    pass


class AdapterNotFound(ModeUnavailable, LookupError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name


class AdapterUnservable(ModeUnavailable):
    """An adapter whose prompts this gateway cannot write: they show the estimate of a CRM it does not serve."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name


@dataclass(frozen=True)
class Route:
    adapter: str | None  # None: the base model
    path: Path | None = None
    mode: RouteMode = "shared"
    fallbacks: list[dict] = field(default_factory=list)  # modes skipped on the way, with the reason
    prompt_crm: str | None = None  # the CRM (name@version) whose estimate the adapter's prompts show

    @property
    def label(self) -> str:
        return self.adapter or BASE


class AdapterRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._prompt_crm: dict[str, str | None] = {}

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

    def prompt_crm(self, name: str) -> str | None:
        """The CRM whose estimate the adapter was trained to read in its prompt (its manifest's `prompt_crm`).
        Adapter folders are immutable versions, so the answer is kept."""
        if name not in self._prompt_crm:
            folder = self.path(name)
            try:
                manifest = AdapterManifest.load(folder) if (folder / MANIFEST).exists() else None
            except ArtifactError as error:
                raise AdapterUnservable(name, str(error)) from None
            self._prompt_crm[name] = manifest.prompt_crm if manifest else None
        return self._prompt_crm[name]

    def version(self, name: str) -> str:
        """The adapter's content hash (what a combiner fitted on it records)."""
        return sha256_of(self.path(name) / "adapter_model.safetensors")[:12]

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


class Router:
    """Chooses and loads the request's adapter, falling back along personal -> cohort -> shared -> base."""

    def __init__(self, registry: AdapterRegistry, engine: EnginePool, default_adapter: str | None,
                 default_mode: AdapterMode, personalizer=None, crm: str | None = None) -> None:
        self.registry = registry
        self.crm = crm  # the served CRM's name@version: what an adapter's prompt may show
        self.engine = engine
        self.default_adapter = default_adapter
        self.default_mode = default_mode
        self.personalizer = personalizer
        self.quarantined: dict[str, str] = {}
        self._unloads: set[asyncio.Task] = set()  # referenced until done (the loop keeps weak refs only)

    @property
    def gates_on_features(self) -> bool:
        """The personal and cohort modes read the request's user features (a bank on the feature CRM)."""
        return self.personalizer is not None and self.personalizer.needs_features

    async def route(self, context: UserContext, adapter: str | None, mode: AdapterMode | None) -> Route:
        if adapter is not None:  # an explicit adapter: that one or an error, no fallback
            route = choose_route(adapter, None, self.registry)
            shown = self._prompt_crm(route.adapter) if route.adapter is not None else None
            if route.adapter is not None:
                await self.engine.ensure_adapter(route.adapter, route.path)
            return Route(route.adapter, route.path, mode="named" if route.adapter else "base", prompt_crm=shown)
        mode = mode or self.default_mode
        skipped: list[dict] = []
        for step in CHAIN[CHAIN.index(mode):]:
            try:
                name, path = await self._resolve(step, context)
                shown = self._prompt_crm(name) if step == "shared" else None  # banks show none
                if name is not None:
                    await self._load(name, path)
                return Route(name, path, mode=step, fallbacks=skipped, prompt_crm=shown)
            except (ModeUnavailable, AdapterLoadFailed) as reason:
                skipped.append({"mode": step, "reason": str(reason)})
        raise AssertionError("the base model is always routable")  # pragma: no cover

    def _prompt_crm(self, name: str) -> str | None:
        """The CRM estimate the adapter's prompts show, when this gateway serves that CRM."""
        shown = self.registry.prompt_crm(name)
        if shown is not None and shown != self.crm:
            raise AdapterUnservable(name, f"its prompts show CRM {shown}'s estimate; this gateway serves "
                                          f"{self.crm or 'no CRM'} (LOREC_CRM)")
        return shown

    async def _resolve(self, mode: AdapterMode, context: UserContext) -> tuple[str | None, Path | None]:
        if mode == "base":
            return None, None
        if mode == "shared":
            if self.default_adapter is None or self.default_adapter == BASE:
                raise NoSharedAdapter("no shared adapter configured")
            return self.default_adapter, self.registry.path(self.default_adapter)
        if self.personalizer is None:
            raise NoBank("no RecLoRA bank configured")
        if mode == "cohort":
            return await asyncio.to_thread(self.personalizer.cohort, context)
        name, path, evicted = await asyncio.to_thread(self.personalizer.personal, context)
        for old in evicted:  # off the disk already; free the engine's slot too
            task = asyncio.create_task(self.engine.unload_adapter(old))
            self._unloads.add(task)
            task.add_done_callback(self._unloads.discard)
        return name, path

    async def _load(self, name: str, path: Path) -> None:
        if name in self.quarantined:
            raise AdapterLoadFailed(f"adapter {name!r} is quarantined: {self.quarantined[name]}")
        try:
            await self.engine.ensure_adapter(name, path)
        except AdapterLoadFailed as exc:
            self.quarantined[name] = str(exc)
            log.warning("adapter %s quarantined: %s", name, exc)
            raise
