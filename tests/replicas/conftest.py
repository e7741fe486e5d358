"""Fixtures of the engine tests: engines on the tiny model, adapters made by peft itself (session-cached)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import transformers

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny model's ops are far too small to gain from 2 threads, and OpenMP threads spin badly when
    other test processes share the 2 cores: one thread is faster and steadier here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_engine(tiny_model_dir: Path) -> Iterator[Callable[..., object]]:
    """make_engine(**EngineConfig overrides) -> Engine on the tiny model; closed after the test."""
    from lorafleet.replicas import Engine

    engines = []

    def make(model_dir: Path | None = None, adapter_source=None, **overrides: object) -> Engine:
        # The torch kernels even if TRITON_INTERPRET=1 is set for the session (the interpreter is slow).
        defaults = {"max_adapters": 8, "max_rank": 64, "kv_cache_bytes": 8 << 20, "kernel_backend": "torch"}
        overrides = defaults | overrides
        engine = Engine.from_pretrained(model_dir or tiny_model_dir, adapter_source=adapter_source, **overrides)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def hf_base(model_dir: Path, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _randomize_lora(peft_model, seed: int) -> None:
    """PEFT starts lora_B at zero: give it weights that move the logits clearly (~0.5 of a module's output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                rank, scale = module.r["default"], module.scaling["default"]
                weight = module.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.5 / (scale * math.sqrt(rank)))


def _randomize_ia3(peft_model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1.0 + 0.4 * torch.randn(param.shape, generator=gen))


@pytest.fixture(scope="session")
def peft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """peft_adapter("lora", r=8, targets=ATTN, rslora=False, seed=0) or peft_adapter("ia3", targets=...,
    feedforward=...): a directory written by peft's save_pretrained (cached per arguments)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    cache: dict[tuple, Path] = {}

    def make(kind: str, r: int = 8, targets: tuple[str, ...] | list[str] = tuple(ATTN), rslora: bool = False,
             seed: int = 0, feedforward: tuple[str, ...] | list[str] = ("down_proj",)) -> Path:
        key = (kind, r, tuple(targets), rslora, seed, tuple(feedforward))
        if key in cache:
            return cache[key]
        if kind == "lora":
            config = LoraConfig(r=r, lora_alpha=16, target_modules=list(targets), use_rslora=rslora,
                                lora_dropout=0.0, task_type="CAUSAL_LM")
        else:
            config = IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward),
                               task_type="CAUSAL_LM")
        peft_model = get_peft_model(hf_base(tiny_model_dir), config)
        (_randomize_lora if kind == "lora" else _randomize_ia3)(peft_model, seed)
        out = tmp_path_factory.mktemp(f"{kind}-r{r}-{len(targets)}m-{'rs' if rslora else 'std'}-s{seed}")
        peft_model.save_pretrained(out)
        cache[key] = out
        return out

    return make


@pytest.fixture(scope="session")
def flora_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """flora_adapter(r, targets, seed): a LoRAFleet FLoRA directory (infra.adapter_maker)."""
    from lorafleet.infra.adapter_maker import make_adapter

    def make(r: int = 4, targets: tuple[str, ...] | list[str] = tuple(ATTN), seed: int = 0) -> Path:
        out = tmp_path_factory.mktemp(f"flora-r{r}-{len(targets)}m-s{seed}")
        return make_adapter(out, tiny_model_dir, "flora", r, list(targets), seed)

    return make
