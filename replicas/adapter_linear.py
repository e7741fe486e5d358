"""AdapterLinear: target linears (q,k,v,o,gate,up,down) that apply each token's own adapter via lorafleet.kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.kernels import BaseLinear, KernelBackend, flora_linear, lora_delta
from lorafleet.replicas.adapter_batch import AdapterBatch


@dataclass(frozen=True, slots=True)
class AdaptedModule:
    """One target module inside an AdapterLinear: its flat (layer, module) index into the step's plans, its
    columns of the output, its base weight rows and its row pools (shared with the adapter cache)."""

    index: int
    cols: slice
    weight: torch.Tensor | None   # [d_out, d_in] view of the group's weight (None when no pool rows)
    in_rows: torch.Tensor         # [P, d_in]
    out_rows: torch.Tensor        # [P, d_out]


class AdapterLinear:
    """Target modules that read the same x (q,k,v; gate,up; or one module): y = x [W_1; W_2; ...]^T (+ b), then
    per module on its columns: + lora_delta for LoRA tokens, flora_linear (x_t (W o B A)^T) for FLoRA / IA3
    tokens. A token has one adapter; the step's plans say which rows and rank it uses.

    weights [d_out_i, d_in] and biases [d_out_i] | None per module; in_rows [P, d_in] / out_rows [P, d_out_i]
    per module: its row pools. One module: the weight is used as given (the GPU path). Several: one GEMM over
    the concatenated weights (the CPU path; prepack=True: oneDNN's prepacked GEMM, see BaseLinear).
    """

    __slots__ = ("base", "modules", "bias", "backend", "splits")

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], in_rows: list[torch.Tensor],
                 out_rows: list[torch.Tensor], indices: list[int], backend: KernelBackend | None = None,
                 prepack: bool = False) -> None:
        assert len(weights) == len(biases) == len(in_rows) == len(out_rows) == len(indices) >= 1
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.splits = [w.shape[0] for w in weights]
        if all(b is None for b in biases):
            self.bias = None
        else:
            self.bias = torch.cat([torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
                                   for w, b in zip(weights, biases, strict=True)])
        is_adaptable = any(rows.shape[0] for rows in in_rows)   # FLoRA needs the plain weight; LoRA does not
        self.base = BaseLinear(weight, prepack=prepack, keep_weight=is_adaptable)
        self.modules: list[AdaptedModule] = []
        lo = 0
        for d_out, inp, out, index in zip(self.splits, in_rows, out_rows, indices, strict=True):
            assert inp.shape[1] == weight.shape[1] and out.shape[1] == d_out
            rows = weight[lo:lo + d_out] if inp.shape[0] else None
            self.modules.append(AdaptedModule(index, slice(lo, lo + d_out), rows, inp, out))
            lo += d_out
        self.backend = backend

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The output [T, sum d_out_i] as one column view per module."""
        return (y,) if len(self.splits) == 1 else y.split(self.splits, dim=1)

    def __call__(self, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        """x [T, d_in] -> [T, sum d_out_i]."""
        if adapters is None and self.bias is None:
            return self.base(x)
        plans = [] if adapters is None else [(m, adapters.lora[m.index], adapters.flora[m.index])
                                             for m in self.modules]
        num_flora = sum(flora is not None for _, _, flora in plans)
        if num_flora and num_flora == len(plans):   # every column comes from flora_linear: no base GEMM
            y = torch.empty(x.shape[0], self.base.d_out, dtype=x.dtype, device=x.device)
        else:   # the FLoRA modules' columns (if any) are overwritten below
            y = self.base(x)
        one = len(self.modules) == 1
        for m, lora, flora in plans:
            out = y if one else y[:, m.cols]
            if flora is not None:   # base rows ride in the same pass over W (rank-0 tokens of the FLoRA plan)
                flora_linear(x, m.weight, m.in_rows, m.out_rows, plan=flora, out=out, backend=self.backend)
            if lora is not None:
                lora_delta(x, m.in_rows, m.out_rows, plan=lora, out=out, accumulate=True, backend=self.backend)
        if self.bias is not None:   # after the adapters, as PEFT adds it
            y += self.bias
        return y
