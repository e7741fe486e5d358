"""Public ops: validate arguments, resolve the adapter-batch plan, dispatch to reference, torch or Triton."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from .lora_bmm import lora_bmm_torch
from .plan import AdapterBatchPlan, IndexLike, ScaleLike, resolve_plan
from .reference import flora_linear_reference, lora_delta_reference
from .torch_flora import flora_linear_torch
from .torch_sgmv import lora_delta_torch
from .triton_runtime import check_triton_device, is_interpreting, is_triton_available
from .validation import KERNEL_DTYPES, TORCH_DTYPES, KernelArgumentError, check_activations, check_matrix, check_out

KernelBackend = Literal["reference", "torch", "triton"]


def select_backend(device: torch.device, backend: KernelBackend | None = None) -> KernelBackend:
    """Explicit choice wins; else CUDA -> triton, CPU -> torch, CPU with TRITON_INTERPRET=1 -> triton."""
    if backend is not None:
        if backend not in ("reference", "torch", "triton"):
            raise KernelArgumentError(f"backend must be 'reference', 'torch' or 'triton', got {backend!r}")
        return backend
    if not is_triton_available():
        return "torch"
    return "triton" if device.type == "cuda" or is_interpreting() else "torch"


def _flora_triton(x: torch.Tensor, weight: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor,
                  plan: AdapterBatchPlan, out: torch.Tensor) -> torch.Tensor:
    from .triton_flora import flora_linear_triton  # Triton is optional: imported on first use only

    return flora_linear_triton(x, weight, in_rows, out_rows, plan, out)


def _delta_triton(x: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor, plan: AdapterBatchPlan,
                  out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    from .triton_sgmv import lora_delta_triton

    return lora_delta_triton(x, in_rows, out_rows, plan, out, accumulate)


def _flora_reference(x: torch.Tensor, weight: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor,
                     plan: AdapterBatchPlan, out: torch.Tensor) -> torch.Tensor:
    y = flora_linear_reference(x, weight, in_rows, out_rows, plan.token_start.cpu(), plan.token_rank.cpu())
    return out.copy_(y)


def _delta_reference(x: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor, plan: AdapterBatchPlan,
                     out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    delta = lora_delta_reference(x, in_rows, out_rows, plan.token_start.cpu(), plan.token_rank.cpu(),
                                 plan.token_scale.cpu())
    return out.add_(delta) if accumulate else out.copy_(delta)


_FLORA: dict[str, Callable[..., torch.Tensor]] = {
    "reference": _flora_reference, "torch": flora_linear_torch, "triton": _flora_triton,
}
_DELTA: dict[str, Callable[..., torch.Tensor]] = {
    "reference": _delta_reference, "torch": lora_delta_torch, "triton": _delta_triton,
}


def _prepare(x: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor,
             backend: KernelBackend | None) -> tuple[torch.Tensor, KernelBackend]:
    backend = select_backend(x.device if isinstance(x, torch.Tensor) else torch.device("cpu"), backend)
    x = check_activations(x, KERNEL_DTYPES if backend == "triton" else TORCH_DTYPES)
    check_matrix("in_rows", in_rows, x, cols=x.shape[1])
    check_matrix("out_rows", out_rows, x, rows=in_rows.shape[0])
    if backend == "triton":
        check_triton_device(x.device)
    return x, backend


def flora_linear(
    x: torch.Tensor, weight: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor,
    token_start: IndexLike | None = None, token_rank: IndexLike | None = None, *,
    plan: AdapterBatchPlan | None = None, out: torch.Tensor | None = None, backend: KernelBackend | None = None,
) -> torch.Tensor:
    """y[t] = sum_{j<r} out_rows[s+j] o ((in_rows[s+j] o x[t]) W^T), s = token_start[t], r = token_rank[t];
    y[t] = x[t] W^T when r = 0. Equals x[t] (W o B A)^T with B[:, j] = in_rows[s+j], A[j] = out_rows[s+j]
    (FLoRA eq. 5/6); IA3 is rank 1 with one side all ones, one pass over W.

    x:           [T, d_in]      float16 | bfloat16 | float32 (float64 too on reference/torch); read.
    weight:      [d_out, d_in]  dtype of x, unit last-dim stride; read.
    in_rows:     [P, d_in]      row pool, dtype of x; adapter rows s .. s+r-1; read.
    out_rows:    [P, d_out]     row pool, dtype of x; read.
    token_start: [T] int        first pool row of each token's adapter (ignored when its rank is 0).
    token_rank:  [T] int        rank r of each token's adapter, 0 = base weight only.
    plan:        AdapterBatchPlan from plan_adapter_batch, instead of token_start/token_rank (no host sync).
    out:         [T, d_out]     dtype of x; every element overwritten in place when given.
    backend:     "reference" | "torch" | "triton"; default by device (see select_backend).
    Returns y [T, d_out] in x.dtype (out when given); accumulation in fp32 (fp64 for float64).
    Invariant: token_start[t] + token_rank[t] <= P for every t.
    """
    x, backend = _prepare(x, in_rows, out_rows, backend)
    check_matrix("weight", weight, x, cols=x.shape[1])
    check_matrix("out_rows", out_rows, x, rows=in_rows.shape[0], cols=weight.shape[0])
    plan = resolve_plan(x, in_rows.shape[0], token_start, token_rank, None, plan)
    out = check_out(out, x.shape[0], weight.shape[0], x)
    if out.numel() == 0:
        return out
    return _FLORA[backend](x, weight, in_rows, out_rows, plan, out)


def lora_delta(
    x: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor,
    token_start: IndexLike | None = None, token_rank: IndexLike | None = None,
    token_scale: ScaleLike | None = None, *, plan: AdapterBatchPlan | None = None,
    out: torch.Tensor | None = None, accumulate: bool = False, backend: KernelBackend | None = None,
) -> torch.Tensor:
    """delta[t] = scale[t] * sum_{j<r} (x[t] . in_rows[s+j]) out_rows[s+j]; zero when r = 0.
    SGMV shrink (x A^T) then expand (h B) per segment; PEFT: in_rows = lora_A rows, out_rows = lora_B
    columns, scale = alpha / r (alpha / sqrt(r) for rsLoRA).

    x:           [T, d_in]   float16 | bfloat16 | float32 (float64 too on reference/torch); read.
    in_rows:     [P, d_in]   row pool, dtype of x, unit last-dim stride; read.
    out_rows:    [P, d_out]  row pool, dtype of x; read.
    token_start, token_rank: [T] int (see flora_linear); token_scale: [T] float, default 1.
    plan:        AdapterBatchPlan instead of the token arrays (no host sync).
    out:         [T, d_out]  dtype of x; overwritten in place, or with accumulate=True: out += delta
                 (the base-plus-adapter form: y = x W^T then lora_delta(..., out=y, accumulate=True)).
    Returns delta [T, d_out] in x.dtype (out when given); accumulation in fp32.
    """
    x, backend = _prepare(x, in_rows, out_rows, backend)
    if accumulate and out is None:
        raise KernelArgumentError("accumulate=True needs out= (the tensor to add the delta into)")
    plan = resolve_plan(x, in_rows.shape[0], token_start, token_rank, token_scale, plan)
    out = check_out(out, x.shape[0], out_rows.shape[1], x)
    if out.numel() == 0:
        return out
    return _DELTA[backend](x, in_rows, out_rows, plan, out, accumulate)


def lora_bmm(
    x: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor,
    token_start: IndexLike | None = None, token_rank: IndexLike | None = None,
    token_scale: ScaleLike | None = None, *, plan: AdapterBatchPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as lora_delta via the FLoRA paper's torch.bmm baseline (appendix A.2): every token's
    adapter gathered and zero-padded to the batch's max rank R, then bmm(bmm(x, adapter_b), adapter_a).
    For benchmarks only: it costs T x R x (d_in + d_out) whatever the real ranks are.

    x [T, d_in], in_rows [P, d_in], out_rows [P, d_out], token arrays or plan as in lora_delta;
    out [T, d_out] overwritten in place when given. Returns [T, d_out] in x.dtype. Torch on any device.
    """
    x, _ = _prepare(x, in_rows, out_rows, "torch")
    plan = resolve_plan(x, in_rows.shape[0], token_start, token_rank, token_scale, plan)
    out = check_out(out, x.shape[0], out_rows.shape[1], x)
    if out.numel() == 0:
        return out
    return lora_bmm_torch(x, in_rows, out_rows, plan, out)
