"""compose.yaml is valid (Debian's docker-compose validates offline) and runs the same commands as `lorec`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_file_is_valid_and_wires_the_services():
    assert shutil.which("docker-compose"), "scripts/install.sh installs Debian's docker-compose"
    out = subprocess.run(["docker-compose", "-f", str(REPO / "compose.yaml"), "config"], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    services = yaml.safe_load(out)["services"]
    assert set(services) == {"redis", "qdrant", "model-init", "vllm", "ingest", "gateway", "trainer", "prometheus",
                             "grafana"}
    assert services["trainer"]["profiles"] == ["trainer"], "the trainer runs only when asked for"
    for name, dockerfile in (("gateway", "gateway"), ("vllm", "engine-cpu"), ("trainer", "trainer")):
        assert services[name]["build"]["dockerfile"] == f"docker/{dockerfile}.Dockerfile"
        assert (REPO / "docker" / f"{dockerfile}.Dockerfile").is_file()
    assert "--appendonly" in services["redis"]["command"]
    gateway = services["gateway"]
    assert gateway["command"] == ["lorec", "serve"]
    assert gateway["environment"]["QDRANT_URL"] == "http://qdrant:6333"
    assert {"redis", "qdrant", "vllm", "ingest"} <= set(gateway["depends_on"])
    assert services["vllm"]["command"][:2] == ["lorec", "engine"]


def test_compose_commands_exist_in_the_cli():
    out = subprocess.run([str(REPO / ".venv" / "bin" / "lorec"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("serve", "engine", "up", "model", "ingest", "adapters"):
        assert command in out


def test_compose_passes_api_keys_from_the_host_environment(monkeypatch):
    keys = '{"compose-key-0123456789abcdef": ["read", "write"]}'
    env = {**os.environ, "LOREC_API_KEYS": keys}
    out = subprocess.run(["docker-compose", "-f", str(REPO / "compose.yaml"), "config"], capture_output=True,
                         text=True, check=True, cwd=REPO, env=env).stdout
    gateway_env = yaml.safe_load(out)["services"]["gateway"]["environment"]
    assert gateway_env["LOREC_API_KEYS"] == keys
    env.pop("LOREC_API_KEYS")
    out = subprocess.run(["docker-compose", "-f", str(REPO / "compose.yaml"), "config"], capture_output=True,
                         text=True, check=True, cwd=REPO, env=env).stdout
    unset = yaml.safe_load(out)["services"]["gateway"]["environment"]["LOREC_API_KEYS"]
    monkeypatch.setenv("LOREC_API_KEYS", unset)  # what the container sees: empty counts as unset
    from service.config import Settings

    assert Settings().auth.api_keys == {}
