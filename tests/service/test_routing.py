"""The adapter registry (service/routing.py): names confined to its root."""

from __future__ import annotations

import pytest

from service.routing import AdapterNotFound, AdapterRegistry, choose_route


def test_adapter_registry_confines_paths(tmp_path):
    root = tmp_path / "registry"
    (root / "good-v1").mkdir(parents=True)
    (root / "good-v1" / "adapter_config.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    (root / "sneaky").symlink_to(outside)
    registry = AdapterRegistry(root)
    assert registry.names() == ["good-v1"]
    assert choose_route(None, "good-v1", registry).path == (root / "good-v1").resolve()
    assert choose_route("base", "good-v1", registry).adapter is None
    assert choose_route(None, None, registry).label == "base"
    for bad in ("../outside", "/abs", str(outside), "sneaky", "missing", ".hidden", "good-v1/../../outside", "..",
                "a/b"):
        with pytest.raises(AdapterNotFound):
            registry.path(bad)
