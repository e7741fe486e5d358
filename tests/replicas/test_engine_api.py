"""Public API of lorafleet.replicas: exports, importable without pydantic / Ray / redis, config validation."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lorafleet.replicas as replicas
from lorafleet.replicas import EngineConfig

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pydantic", "pydantic_settings", "ray", "redis", "transformers", "peft"):
            raise ImportError(f"{name} is not on the GPU box")
sys.meta_path.insert(0, Block())
"""


def test_public_api():
    assert {"Engine", "EngineConfig", "SamplingParams", "RequestOutput", "RequestMetrics"} <= set(replicas.__all__)
    assert all(hasattr(replicas, name) for name in replicas.__all__)


def test_engine_runs_without_pydantic_ray_redis_transformers(tiny_model_dir):
    code = BLOCKER + f"""
import torch
torch.set_num_threads(1)
from lorafleet.replicas import Engine, SamplingParams
engine = Engine.from_pretrained({str(tiny_model_dir)!r}, max_adapters=2, max_rank=8, kv_cache_bytes=1 << 20)
out = engine.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
assert len(out.token_ids) == 3, out
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("bad", [
    dict(max_num_seqs=0), dict(max_num_seqs=64, max_batched_tokens=32), dict(dtype="float8"),
    dict(device="tpu"), dict(adapter_pool_rows=4, max_rank=8), dict(target_modules=("lm_head",)),
    dict(num_kv_blocks=0), dict(gpu_memory_utilization=1.5),
])
def test_engine_config_validation(bad):
    with pytest.raises(ValueError):
        EngineConfig(**bad)


def test_engine_config_defaults_and_stats(make_engine):
    config = EngineConfig(max_adapters=4, max_rank=16)
    assert config.num_pool_rows == 64 and config.target_modules[0] == "q_proj"
    engine = make_engine(max_model_len=64)
    assert engine.max_model_len == 64
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0 and stats["adapters"]["num_resident"] == 0


def test_engine_config_comes_from_settings_by_the_same_field_names():
    """One Settings -> EngineConfig path, no renaming map: a field renamed on one side stops being carried (and
    this list of shared names fails)."""
    from dataclasses import fields

    from lorafleet.infra.config import Settings, load_settings

    shared = {f.name for f in fields(EngineConfig)} & set(Settings.model_fields)
    assert shared == {"device", "dtype", "max_num_seqs", "max_batched_tokens", "kv_cache_bytes", "kv_block_size",
                      "max_adapters", "max_rank", "max_adapter_bytes", "host_cache_max_bytes", "adapter_resync_s",
                      "adapter_pool_rows"}
    settings = load_settings(max_num_seqs=3, max_batched_tokens=96, kv_cache_bytes=1 << 20, kv_block_size=8,
                             max_adapters=5, max_rank=32, max_adapter_bytes=1 << 20, host_cache_max_bytes=7,
                             adapter_resync_s=2.5, dtype="bfloat16", adapter_pool_rows=40)
    config = EngineConfig.from_settings(settings, kernel_backend="torch")
    assert all(getattr(config, name) == getattr(settings, name) for name in shared)
    assert config.kernel_backend == "torch"
    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.from_settings(settings, block_size=8)
