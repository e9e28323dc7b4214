#!/usr/bin/env bash
# The test suite: unit tests and integration tests against real redis-server, Qdrant Edge,
# qdrant-client (local mode), vLLM servers (a tiny Llama built in a fixture, and Gemma 3 270M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/pytest -q -p no:cacheprovider --durations=10 "$@"
