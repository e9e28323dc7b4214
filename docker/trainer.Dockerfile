# The offline trainer (`lorec train ...`, `lorec eval`): torch + transformers + peft, no vLLM.
# Build: docker build -f docker/trainer.Dockerfile -t lorec-trainer .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/lorec
COPY pyproject.toml README.md ./
COPY service ./service
COPY adapters ./adapters
RUN /opt/lorec/bin/pip install torch==2.13.0 && /opt/lorec/bin/pip install ".[bench]"

FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1=12.2.* && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 lorec && mkdir -p /var/lib/lorec && chown lorec /var/lib/lorec
COPY --from=build /opt/lorec /opt/lorec
ENV PATH=/opt/lorec/bin:$PATH LOREC_DATA_DIR=/var/lib/lorec HF_HUB_OFFLINE=1
USER 10001
WORKDIR /var/lib/lorec
HEALTHCHECK NONE
ENTRYPOINT ["lorec"]
CMD ["train", "--help"]
