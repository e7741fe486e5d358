"""One settings model for all of LoRAFleet: env vars `LORAFLEET_*`, an optional YAML file, defaults."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lorafleet.infra.errors import ConfigError

CONFIG_FILE_ENV = "LORAFLEET_CONFIG"


class Settings(BaseSettings):
    """Every tunable of LoRAFleet. Env var = `LORAFLEET_` + field name upper-cased.

    Precedence: keyword overrides > env vars > YAML file (`LORAFLEET_CONFIG` or `--config`) > defaults.
    """

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="forbid", validate_default=True)


    # infra
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field(default="lorafleet", pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    store_url: str = "./.lorafleet/store"
    s3_endpoint_url: str | None = None
    hot_cache_max_bytes: int = Field(default=512 * 2**20, ge=0)
    host_cache_max_bytes: int = Field(default=1 * 2**30, ge=0)   # a replica's host tier of validated adapters
    adapter_resync_s: float = Field(default=30.0, ge=0)   # replicas recheck held adapters' versions (0 = never)
    store_timeout_s: float = Field(default=5.0, gt=0)
    # adapters
    max_rank: int = Field(default=128, ge=1, le=4096)
    max_adapter_bytes: int = Field(default=1 * 2**30, ge=1)
    # model / engine
    model_dir: str = "./.lorafleet/models/smollm2-135m"   # what `make demo` / `lorafleet make-model` writes
    base_model_name: str = "base"
    max_adapters: int = Field(default=64, ge=1)
    adapter_pool_rows: int | None = Field(default=None, ge=1)   # adapter device rows; None: max_adapters x max_rank
    max_num_seqs: int = Field(default=64, ge=1)
    max_batched_tokens: int = Field(default=2048, ge=1)
    kv_cache_bytes: int = Field(default=256 * 2**20, ge=1)
    kv_block_size: int = Field(default=16, ge=1)
    dtype: str = Field(default="float32", pattern=r"^(float32|float16|bfloat16)$")
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    replica_num_cpus: float = Field(default=1.0, ge=0)
    # The engine behind every replica: LoRAFleet's own, or vLLM (README "vLLM replicas"; LoRA adapters only).
    engine: str = Field(default="lorafleet", pattern=r"^(lorafleet|vllm)$")
    # Interpreter of vLLM replicas (Ray runtime_env py_executable). None: the project's .venv-vllm/bin/python
    # (`make test` builds it) when it exists, else this one; "": this interpreter (an image with vllm installed).
    vllm_python: str | None = None
    # Modules vLLM wraps for LoRA (PEFT names: q_proj ...); None = every linear module, so any LoRA adapter runs.
    # Fewer is faster (vLLM computes LoRA at max_lora_rank in every wrapped module); others answer 400.
    vllm_lora_target_modules: list[str] | None = None
    # One max_lora_rank for every vLLM replica (as a plain vLLM deployment runs); None = each replica's rank class.
    vllm_max_lora_rank: int | None = Field(default=None, ge=1, le=512)
    # serving
    num_replicas: int = Field(default=2, ge=1)
    num_routers: int = Field(default=1, ge=1)   # ingress replicas; each holds its own in-flight and queue limits
    # Replica autoscaling: off (num_replicas), queue (Serve's queue-length policy) or adapter-aware (replicas for
    # the tokens/s each rank class needs at its operating point, and the adapters' bytes; cluster/autoscaling.py).
    autoscaling: str = Field(default="off", pattern=r"^(off|queue|adapter-aware)$")
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=8, ge=1)
    autoscale_target_utilization: float = Field(default=0.7, gt=0, le=1)   # of each class's operating point
    # adapter-aware: follow the demand's trend over the last trend_window_s, trend_lead_s ahead (the upscale delay
    # plus a replica's start), damped; 0 = size from the current demand alone
    autoscale_trend_damping: float = Field(default=0.5, ge=0, le=1)
    autoscale_trend_window_s: float = Field(default=60.0, gt=0)
    autoscale_trend_lead_s: float = Field(default=30.0, ge=0)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)   # hysteresis: demand must stay low this long
    # Custom Ray resources a replica / the ingress and controller need, to pin them to node types on a cluster,
    # e.g. replica_resources {"lorafleet_replica": 1} on GPU workers and router_resources {"lorafleet_head": 0.01}.
    replica_resources: dict[str, float] = {}
    router_resources: dict[str, float] = {}
    routing_policy: str = Field(default="rank-aware", pattern=r"^(rank-aware|random|affinity)$")
    rebalance_period_s: float = Field(default=30.0, gt=0)
    # Capacities for placement: a file written by `lorafleet profile` (an operator's measurement); None = the
    # replica of rank 0 profiles its own engine on first start, cached in profile_dir per model, device and settings.
    operating_points: str | None = None
    profile_dir: str = "./.lorafleet/profiles"
    slo_p95_ttft_s: float = Field(default=1.0, gt=0)   # the SLO placement sizes replicas for
    slo_p95_tpot_s: float = Field(default=0.1, gt=0)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    # router: auth and limits (README "Auth and limits")
    api_keys: dict[str, str | list[str]] = {}  # key -> "*" or [adapter ids]; JSON in LORAFLEET_API_KEYS
    admin_key: str | None = None  # adapter writes and rebalance; no keys at all = open
    # Also the keys of the Redis hash `{redis_prefix}:api_keys` (`lorafleet keys add`), re-read every refresh.
    api_keys_from_redis: bool = False
    api_keys_refresh_s: float = Field(default=5.0, gt=0)
    max_inflight_requests: int = Field(default=256, ge=1)
    # Backpressure below the router: each replica runs up to max_num_seqs and queues up to
    # replica_max_queued_requests more in its engine; requests for which no replica has room wait at the router
    # in a queue of at most max_queued_requests (per router process); past either bound: 429 + Retry-After.
    replica_max_queued_requests: int = Field(default=64, ge=0)
    max_queued_requests: int = Field(default=256, ge=1)  # Serve counts requests not yet assigned: room for bursts
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_tokens_limit: int = Field(default=4096, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    max_stop_strings: int = Field(default=8, ge=0, le=64)
    max_request_bytes: int = Field(default=1 << 20, ge=1)

    @field_validator("api_keys")
    @classmethod
    def _key_scopes(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        # The message never includes a key: settings errors are printed.
        for scope in value.values():
            if scope != "*" and not isinstance(scope, list):
                raise ValueError('each value must be "*" or a list of adapter ids')
        if any(not key for key in value):
            raise ValueError("API keys must be non-empty")
        return value

    @field_validator("vllm_lora_target_modules")
    @classmethod
    def _vllm_modules(cls, value: list[str] | None) -> list[str] | None:
        from lorafleet.infra.base_spec import TARGET_MODULES

        if value is not None and (not value or any(m not in TARGET_MODULES for m in value)):
            raise ValueError(f"must be a non-empty list of {', '.join(TARGET_MODULES)} (or null: all of them)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from env + optional YAML; raises ConfigError naming the bad field or file."""
    from pydantic import ValidationError

    path = Path(config_file) if config_file else None
    if path is None and os.environ.get(CONFIG_FILE_ENV):
        path = Path(os.environ[CONFIG_FILE_ENV])
    file_values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of setting names to values")
        file_values = loaded
    try:
        # YAML values rank below env vars: pass only keys that no env var sets.
        env_keys = {k[len("LORAFLEET_"):].lower() for k in os.environ if k.startswith("LORAFLEET_")}
        merged = {k: v for k, v in file_values.items() if k not in env_keys}
        merged.update(overrides)
        return Settings(**merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}setting '{field}': {err['msg']}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, loaded once."""
    return load_settings()
