"""deploy/: the kustomize builds validate against the Kubernetes API schemas (kubernetes-validate,
strict) and wire the parts together the way the gateway's settings expect."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from service.config import ENVIRONMENT, Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.37.0"
SECRET_KEYS = {"redis-password", "qdrant-api-key", "api-keys.json"}


def build(overlay: str) -> dict[tuple[str, str], dict]:
    assert shutil.which("kubectl"), "scripts/install.sh installs kubectl (kustomize is built in)"
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "kustomize" / overlay)], capture_output=True,
                         text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    # generated ConfigMaps carry a content hash suffix: key them by their base name
    return {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "ConfigMap"
             else d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module", params=["base", "overlays/cpu"])
def docs(request):
    return request.param, build(request.param)


def pod_spec(docs, kind, name):
    return docs[(kind, name)]["spec"]["template"]["spec"]


def containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


def config(resources) -> dict[str, str]:
    return resources[("ConfigMap", "lorec-config")]["data"]


def test_every_resource_passes_strict_schema_validation(docs):
    _, resources = docs
    for doc in resources.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"Deployment", "StatefulSet", "HorizontalPodAutoscaler", "Service", "PersistentVolumeClaim", "Job",
            "ConfigMap", "PodDisruptionBudget"} <= {kind for kind, _ in resources}


def test_the_validator_rejects_a_broken_manifest(docs):
    _, resources = docs
    broken = yaml.safe_load(yaml.safe_dump(resources[("Deployment", "lorec-gateway")]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/healthz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_probes_hpa_and_service_wiring(docs):
    _, resources = docs
    gateway = pod_spec(resources, "Deployment", "lorec-gateway")["containers"][0]
    assert gateway["command"] == ["lorec", "serve"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    engine = pod_spec(resources, "StatefulSet", "lorec-engine")["containers"][0]
    assert engine["command"][:2] == ["lorec", "engine"]
    assert {engine[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe")} == {"/health"}
    ready_file = engine["command"][engine["command"].index("--ready-file") + 1]
    assert engine["readinessProbe"]["exec"]["command"] == ["test", "-f", ready_file], "ready means warm"
    assert any(ready_file.startswith(m["mountPath"] + "/") for m in engine["volumeMounts"]), "writable"
    hpa = resources[("HorizontalPodAutoscaler", "lorec-gateway")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lorec-gateway"}
    assert hpa["minReplicas"] >= 2
    service = resources[("Service", "lorec-gateway")]["spec"]
    assert service["selector"] == resources[("Deployment", "lorec-gateway")]["spec"]["selector"]["matchLabels"]


def test_config_is_valid_settings_and_lists_every_engine_replica(docs, monkeypatch):
    _, resources = docs
    env = config(resources)
    assert set(env) <= ENVIRONMENT, f"unknown settings: {set(env) - ENVIRONMENT}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    engine = resources[("StatefulSet", "lorec-engine")]
    hosts = [urlparse(u).hostname for u in settings.engine.urls]
    name, service = engine["metadata"]["name"], engine["spec"]["serviceName"]
    assert hosts == [f"{name}-{i}.{service}" for i in range(engine["spec"]["replicas"])]
    assert resources[("Service", service)]["spec"]["clusterIP"] == "None", "replicas need stable DNS names"
    assert settings.redis.cluster and settings.index.qdrant_url


def test_dependencies_match_the_official_charts_values(docs):
    _, resources = docs
    redis_values = yaml.safe_load((DEPLOY / "charts" / "redis-cluster.values.yaml").read_text())
    qdrant_values = yaml.safe_load((DEPLOY / "charts" / "qdrant.values.yaml").read_text())
    gateway = pod_spec(resources, "Deployment", "lorec-gateway")["containers"][0]
    redis_url = next(e["value"] for e in gateway["env"] if e["name"] == "LOREC_REDIS_URL")
    assert urlparse(redis_url).hostname == redis_values["fullnameOverride"]
    assert urlparse(config(resources)["QDRANT_URL"]).hostname == qdrant_values["fullnameOverride"]
    assert qdrant_values["config"]["cluster"]["enabled"] and qdrant_values["replicaCount"] >= 3
    assert redis_values["cluster"]["nodes"] >= 6 and "appendonly yes" in redis_values["redis"]["configmap"]
    assert (redis_values["existingSecret"], redis_values["existingSecretPasswordKey"]) == \
        ("lorec-secrets", "redis-password")


def test_secrets_used_are_the_ones_the_readme_creates(docs):
    _, resources = docs
    used = set()
    for kind, name in (("Deployment", "lorec-gateway"), ("Job", "lorec-ingest")):
        spec = pod_spec(resources, kind, name)
        for c in containers(spec):
            used |= {e["valueFrom"]["secretKeyRef"]["key"] for e in c.get("env", []) if "valueFrom" in e}
        used |= {i["key"] for v in spec["volumes"] if "secret" in v for i in v["secret"]["items"]}
    assert used == SECRET_KEYS
    readme = (DEPLOY / "README.md").read_text()
    assert "create secret generic lorec-secrets" in readme
    for key in SECRET_KEYS:
        assert f"{key}=" in readme, f"the README's create-secret command lacks {key}"


def test_pods_run_as_non_root_with_pinned_images(docs):
    _, resources = docs
    for kind, name in (("Deployment", "lorec-gateway"), ("StatefulSet", "lorec-engine"), ("Job", "lorec-ingest")):
        spec = pod_spec(resources, kind, name)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in containers(spec):
            image, _, tag = c["image"].rpartition(":")
            assert image and tag and tag != "latest", c["image"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_gpu_in_base_and_cpu_engine_in_the_cpu_overlay(docs):
    overlay, resources = docs
    engine = pod_spec(resources, "StatefulSet", "lorec-engine")["containers"][0]
    dtype = config(resources)["LOREC_ENGINE_DTYPE"]
    if overlay == "base":
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1" and dtype == "bfloat16"
        assert engine["image"].startswith("lorec/engine-gpu:")
    else:
        assert "nvidia.com/gpu" not in engine["resources"]["limits"] and dtype == "auto"
        assert engine["image"].startswith("lorec/engine-cpu:")
