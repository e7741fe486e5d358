"""EngineConfig: every knob of one replica engine, plain data validated in __post_init__ (no pydantic)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from lorafleet.infra.base_spec import TARGET_MODULES

DTYPES = ("float32", "float16", "bfloat16")
# Default KV budget on CPU; on CUDA the budget is a fraction of the free memory (gpu_memory_utilization).
DEFAULT_CPU_KV_BYTES = 256 << 20


@dataclass(slots=True)
class EngineConfig:
    """Limits of the scheduler, KV cache and adapter cache of one engine.

    Adapter memory is a row budget shared by all adapters (S-LoRA unified paging): an adapter of rank r
    takes r rows of every target module's pool; `adapter_pool_rows` defaults to max_adapters x max_rank.
    """

    device: str = "cpu"
    dtype: str = "float32"
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_model_len: int | None = None        # default: the model's max_position_embeddings (capped by KV)
    kv_block_size: int = 16
    num_kv_blocks: int | None = None        # explicit block count; else from kv_cache_bytes / memory
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    target_modules: tuple[str, ...] = tuple(TARGET_MODULES)   # modules adapters may target (pools for these only)
    max_adapters: int = 16                  # device slots: adapters resident at once
    max_rank: int = 64
    adapter_pool_rows: int | None = None
    max_adapter_bytes: int = 1 << 30
    host_cache_max_bytes: int = 1 << 30     # host tier of fetched adapters (LRU, unused ones only)
    num_adapter_loaders: int = 2            # background fetch threads (prefetch of queued requests)
    adapter_resync_s: float = 30.0          # recheck held adapters' versions with the store this often (0 = never)
    kernel_backend: str | None = None       # lorafleet.kernels backend; None = by device
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "max_num_seqs", "max_batched_tokens", "kv_block_size", "max_adapters", "max_rank",
                  "max_adapter_bytes", "num_adapter_loaders")
        self.target_modules = tuple(self.target_modules)
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {list(TARGET_MODULES)}, got {unknown}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if self.max_num_seqs > self.max_batched_tokens:
            raise ValueError("max_num_seqs must be <= max_batched_tokens (every running sequence decodes a token)")
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_bytes", "adapter_pool_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.adapter_pool_rows is not None and self.adapter_pool_rows < self.max_rank:
            raise ValueError(f"adapter_pool_rows={self.adapter_pool_rows} cannot hold one adapter of "
                             f"max_rank={self.max_rank}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.host_cache_max_bytes < 0:
            raise ValueError("host_cache_max_bytes must be >= 0")
        if not self.adapter_resync_s >= 0:
            raise ValueError("adapter_resync_s must be >= 0 (0 = no periodic resync)")

    @property
    def num_pool_rows(self) -> int:
        return self.adapter_pool_rows or self.max_adapters * self.max_rank

    @classmethod
    def from_settings(cls, settings: object, **overrides: object) -> EngineConfig:
        """The engine's fields from LoRAFleet's Settings (same names, nothing renamed), then `overrides`.
        Duck-typed: the engine never imports pydantic."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        return cls.from_kwargs(**(values | overrides))

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineConfig:
        """EngineConfig from keyword overrides; unknown names are a clear error rather than ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)  # type: ignore[arg-type]


def _positive(config: EngineConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
