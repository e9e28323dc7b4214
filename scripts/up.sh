#!/usr/bin/env bash
# One command from a fresh machine to a running lorec on embedded defaults:
# installs what is missing, then `lorec up` starts redis-server (AOF, data in $LOREC_DATA_DIR),
# the embedded Qdrant Edge index, the vLLM server, ingests MovieLens from $LOREC_DATA
# (default ../shared/data/ml-100k) when not yet ingested, and serves the gateway on :8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/lorec up "$@"
