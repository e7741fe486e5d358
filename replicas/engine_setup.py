"""Builds an engine's parts from a model directory and EngineConfig: weights, pools, KV cache, scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.infra.adapter_source import AdapterSource
from lorafleet.infra.base_spec import BaseModelSpec
from lorafleet.replicas.adapter_cache import AdapterCache
from lorafleet.replicas.adapter_loader import AdapterLoader
from lorafleet.replicas.adapter_pool import AdapterPools
from lorafleet.replicas.attention import PagedKVCache
from lorafleet.replicas.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from lorafleet.replicas.cpu_runtime import tune_malloc
from lorafleet.replicas.kv_cache import BlockManager, KVLayout
from lorafleet.replicas.model import LlamaModel
from lorafleet.replicas.model_runner import ModelRunner
from lorafleet.replicas.sampler import Sampler
from lorafleet.replicas.scheduler import Scheduler
from lorafleet.replicas.tokenizer import Tokenizer
from lorafleet.replicas.weights import ModelConfig, load_state_dict

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class EngineParts:
    model_config: ModelConfig
    tokenizer: Tokenizer
    max_model_len: int
    scheduler: Scheduler
    runner: ModelRunner
    sampler: Sampler
    adapters: AdapterCache


def build_parts(model_dir: Path, config: EngineConfig, source: AdapterSource | None) -> EngineParts:
    device = torch.device(config.device)
    dtype = TORCH_DTYPES[config.dtype]
    if device.type == "cpu":
        tune_malloc()
    model_config = ModelConfig.from_model_dir(model_dir)
    spec = BaseModelSpec.from_model_dir(model_dir)
    tokenizer = Tokenizer.from_model_dir(model_dir, model_config.eos_token_ids)
    state = load_state_dict(model_dir, model_config, dtype, device)
    pools = AdapterPools(model_config.num_layers, spec.module_shapes, config.num_pool_rows, config.max_adapters,
                         dtype, device, config.target_modules)
    layout = KVLayout(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, config.kv_block_size,
                      torch.empty((), dtype=dtype).element_size())
    num_blocks = config.num_kv_blocks or layout.num_blocks_for(_kv_budget(config, device))
    max_model_len = min(config.max_model_len or model_config.max_position_embeddings, num_blocks * config.kv_block_size)
    model = LlamaModel(model_config, state, pools, max_positions=max_model_len, backend=config.kernel_backend)
    kv = PagedKVCache(model_config.num_layers, num_blocks, config.kv_block_size, model_config.num_kv_heads,
                      model_config.head_dim, dtype, device)
    blocks = BlockManager(num_blocks, config.kv_block_size)
    loader = AdapterLoader(spec, pools.target_modules, max_rank=config.max_rank, max_bytes=config.max_adapter_bytes,
                           dtype=dtype, pin_memory=device.type == "cuda")
    adapters = AdapterCache(pools, loader, source, host_cache_max_bytes=config.host_cache_max_bytes,
                            num_loaders=config.num_adapter_loaders, resync_interval_s=config.adapter_resync_s)
    scheduler = Scheduler(blocks, adapters, max_num_seqs=config.max_num_seqs,
                          max_batched_tokens=config.max_batched_tokens)
    return EngineParts(model_config, tokenizer, max_model_len, scheduler, ModelRunner(model, kv, pools),
                       Sampler(device, config.seed), adapters)


def _kv_budget(config: EngineConfig, device: torch.device) -> int:
    """Bytes for KV blocks: explicit, else a CPU default, else a fraction of free GPU memory (vLLM style)."""
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    free, total = torch.cuda.mem_get_info(device)
    # Blocks torch's caching allocator holds but no tensor uses (a closed engine's KV cache, say) are free to us.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(0, int(free - total * (1 - config.gpu_memory_utilization)))
