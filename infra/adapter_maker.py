"""Seeded random adapters (PEFT LoRA / IA3 and LoRAFleet FLoRA directories), scaled to move outputs ~30%."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafleet.infra.adapter_files import CONFIG_FILE, WEIGHTS_FILE
from lorafleet.infra.base_spec import TARGET_MODULES, BaseModelSpec

ADAPTER_TYPES = ("lora", "ia3", "flora")
# Relative size of the adapter's effect on a module's output: large enough to change greedy tokens.
EFFECT_SIZE = 0.3


def make_adapter(
    out_dir: str | Path,
    base_dir: str | Path,
    adapter_type: str,
    rank: int,
    targets: list[str],
    seed: int = 0,
    *,
    use_rslora: bool = False,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors for a random adapter of `base_dir`'s model."""
    if adapter_type not in ADAPTER_TYPES:
        raise ValueError(f"unknown adapter type '{adapter_type}'; choose one of: {', '.join(ADAPTER_TYPES)}")
    unknown = [t for t in targets if t not in TARGET_MODULES]
    if unknown or not targets:
        raise ValueError(f"unknown target modules {unknown}; choose from: {', '.join(TARGET_MODULES)}")
    if rank < 1 or (adapter_type == "ia3" and rank != 1):
        raise ValueError(f"rank must be >= 1 (and exactly 1 for ia3), got {rank}")
    base = BaseModelSpec.from_model_dir(base_dir)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    config: dict = {"base_model_name_or_path": str(base_dir), "task_type": "CAUSAL_LM", "inference_mode": True}
    feedforward = [t for t in targets if t == "down_proj"]  # PEFT's Llama default for IA3
    alpha = 2 * rank
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    for layer in range(base.num_layers):
        for name in targets:
            d_out, d_in = base.module_shapes[name]
            prefix = f"base_model.model.model.layers.{layer}.{TARGET_MODULES[name]}.{name}"
            if adapter_type == "lora":
                # (B A x)_i has std ~ sqrt(r)·std_B·rms(x) with std_A = 1/sqrt(d_in).
                std_b = EFFECT_SIZE / (scale * math.sqrt(rank))
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * std_b
            elif adapter_type == "ia3":
                shape = (1, d_in) if name in feedforward else (d_out, 1)
                tensors[f"{prefix}.ia3_l"] = 1.0 + EFFECT_SIZE * torch.randn(*shape, generator=gen)
            else:
                # Mask M = out^T in with entries 1 + O(EFFECT_SIZE): rank-1 term of ones plus small noise rows.
                in_rows = torch.randn(rank, d_in, generator=gen) * math.sqrt(EFFECT_SIZE / rank)
                out_rows = torch.randn(rank, d_out, generator=gen) * math.sqrt(EFFECT_SIZE / rank)
                in_rows[0] += 1.0
                out_rows[0] += 1.0
                tensors[f"{prefix}.flora_B.weight"] = in_rows
                tensors[f"{prefix}.flora_A.weight"] = out_rows
    if adapter_type == "lora":
        config |= {
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora,
            "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        }
    elif adapter_type == "ia3":
        config |= {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward}
    else:
        config |= {"peft_type": "FLORA", "r": rank, "target_modules": targets}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out
