"""FLoRA for training (PEFT has none): trainable multiplicative masks on a Hugging Face Llama's linears, saved in
LoRAFleet's FLoRA format.

Per target linear W [d_out, d_in]: W' = W ∘ (out_rowsᵀ in_rows) (FLoRA eq. 5, rank r), in_rows [r, d_in], out_rows
[r, d_out]. Initialised so that W' = W: row 0 of both is ones, the other in_rows are random and their out_rows zero
(the LoRA recipe: the update starts at zero, and its gradient does not).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from lorafleet.infra.adapter_files import CONFIG_FILE, WEIGHTS_FILE
from lorafleet.infra.base_spec import TARGET_MODULES


class FloraLinear(nn.Module):
    """A frozen linear whose weight is masked by a rank-r FLoRA mask."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        d_out, d_in = base.weight.shape
        in_rows = torch.randn(rank, d_in, generator=generator)
        in_rows[0] = 1.0
        out_rows = torch.zeros(rank, d_out)
        out_rows[0] = 1.0
        self.in_rows = nn.Parameter(in_rows.to(base.weight.dtype))
        self.out_rows = nn.Parameter(out_rows.to(base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.out_rows.T @ self.in_rows   # [d_out, d_in]
        return F.linear(x, self.base.weight * mask, self.base.bias)


def add_flora(model: nn.Module, targets: list[str], rank: int, layers: list[int], seed: int) -> list[nn.Parameter]:
    """Wrap the target linears of `layers` in `model` (a LlamaForCausalLM) in place; returns the trainable params."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    params: list[nn.Parameter] = []
    for index in layers:
        layer = model.model.layers[index]
        for name in targets:
            block = getattr(layer, TARGET_MODULES[name])
            wrapped = FloraLinear(getattr(block, name), rank, generator)
            setattr(block, name, wrapped)
            params += [wrapped.in_rows, wrapped.out_rows]
    return params


def save_flora(model: nn.Module, out_dir: Path, targets: list[str], rank: int, base_dir: str) -> None:
    """adapter_config.json ("peft_type": "FLORA") + adapter_model.safetensors (flora_B = in_rows, flora_A =
    out_rows), the layout `lorafleet.infra.adapters` reads."""
    tensors = {}
    for index, layer in enumerate(model.model.layers):
        for name in targets:
            module = getattr(getattr(layer, TARGET_MODULES[name]), name)
            if isinstance(module, FloraLinear):
                prefix = f"base_model.model.model.layers.{index}.{TARGET_MODULES[name]}.{name}"
                tensors[f"{prefix}.flora_B.weight"] = module.in_rows.detach().float().contiguous()
                tensors[f"{prefix}.flora_A.weight"] = module.out_rows.detach().float().contiguous()
    config = {"peft_type": "FLORA", "r": rank, "target_modules": targets, "base_model_name_or_path": base_dir,
              "task_type": "CAUSAL_LM", "inference_mode": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
