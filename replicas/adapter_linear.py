"""AdapterLinear: a target linear (q,k,v,o,gate,up,down) that applies each token's own adapter via lorafleet.kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.kernels import KernelBackend, flora_linear, lora_delta
from lorafleet.replicas.adapter_batch import AdapterBatch


class AdapterLinear:
    """y_t = x_t W^T (+ b) for base tokens; + lora_delta for LoRA tokens; flora_linear (x_t (W o B A)^T)
    for FLoRA / IA3 tokens. A token has one adapter; the step's plans say which rows and rank it uses.

    weight [d_out, d_in], bias [d_out] or None; in_rows [P, d_in] / out_rows [P, d_out]: this module's
    row pools (shared with the adapter cache, which writes them between steps).
    """

    __slots__ = ("weight", "bias", "in_rows", "out_rows", "index", "backend")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_rows: torch.Tensor,
                 out_rows: torch.Tensor, index: int, backend: KernelBackend | None = None) -> None:
        assert in_rows.shape[1] == weight.shape[1] and out_rows.shape[1] == weight.shape[0]
        self.weight = weight
        self.bias = bias
        self.in_rows = in_rows
        self.out_rows = out_rows
        self.index = index          # flat (layer, module) index into the step's plans
        self.backend = backend

    def __call__(self, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        """x [T, d_in] -> [T, d_out]."""
        lora = flora = None
        if adapters is not None:
            lora, flora = adapters.lora[self.index], adapters.flora[self.index]
        if flora is None:
            y = F.linear(x, self.weight)
        else:   # base rows ride in the same pass over W (rank-0 tokens of the FLoRA plan)
            y = flora_linear(x, self.weight, self.in_rows, self.out_rows, plan=flora, backend=self.backend)
        if lora is not None:
            lora_delta(x, self.in_rows, self.out_rows, plan=lora, out=y, accumulate=True, backend=self.backend)
        if self.bias is not None:
            y += self.bias
        return y
