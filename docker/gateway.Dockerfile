# The gateway (FastAPI): CPU torch for the item encoder, the CRM and RecLoRA mixing; no vLLM.
# Build: docker build -f docker/gateway.Dockerfile -t lorec-gateway .
# A CPU-only torch wheel index keeps the image small: --build-arg PIP_EXTRA_INDEX_URL=<index>.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/lorec
COPY pyproject.toml README.md ./
COPY service ./service
COPY adapters ./adapters
RUN /opt/lorec/bin/pip install torch==2.13.0 && /opt/lorec/bin/pip install .

FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends curl=7.88.* libgomp1=12.2.* \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 lorec && mkdir -p /var/lib/lorec && chown lorec /var/lib/lorec
COPY --from=build /opt/lorec /opt/lorec
ENV PATH=/opt/lorec/bin:$PATH LOREC_DATA_DIR=/var/lib/lorec LOREC_HOST=0.0.0.0 HF_HUB_OFFLINE=1
USER 10001
WORKDIR /var/lib/lorec
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["lorec", "serve"]
