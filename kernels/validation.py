"""Argument checks shared by every op (shapes, dtypes, devices, strides) and their error type, before any launch."""

from __future__ import annotations

import torch


class KernelArgumentError(ValueError):
    """A kernel argument has the wrong shape, dtype, device, layout or value; the message names it."""

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The torch paths also take float64 so the reference and the CPU path can be compared exactly.
TORCH_DTYPES = (*KERNEL_DTYPES, torch.float64)


def check_activations(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """x: [T, d_in]; any row stride, copied only when its last dim is strided (cheap: activations)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise KernelArgumentError(f"x must be a 2-D tensor [T, d_in], got {_describe(x)}")
    if x.dtype not in dtypes:
        raise KernelArgumentError(f"x has dtype {x.dtype}; supported: {', '.join(map(str, dtypes))}")
    return x if x.stride(1) == 1 else x.contiguous()


def check_matrix(name: str, tensor: torch.Tensor, x: torch.Tensor, *, rows: int | None = None,
                 cols: int | None = None) -> None:
    """Weights and row pools: same dtype/device as x, exact shape, unit stride in the last dim.

    Pools are large and long-lived, so a silent per-call copy would hide a real cost: reject instead.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        raise KernelArgumentError(f"{name} must be a 2-D tensor, got {_describe(tensor)}")
    if tensor.dtype != x.dtype:
        raise KernelArgumentError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}; they must match")
    if tensor.device != x.device:
        raise KernelArgumentError(f"{name} is on {tensor.device} but x is on {x.device}")
    if (rows is not None and tensor.shape[0] != rows) or (cols is not None and tensor.shape[1] != cols):
        want = f"[{rows if rows is not None else '*'}, {cols if cols is not None else '*'}]"
        raise KernelArgumentError(f"{name} has shape {list(tensor.shape)}, expected {want}")
    if tensor.shape[1] > 1 and tensor.stride(1) != 1:
        raise KernelArgumentError(
            f"{name} must have unit stride in its last dim (got strides {tensor.stride()}); "
            f"make it contiguous once when it is loaded, not per call")


def check_out(out: torch.Tensor | None, num_tokens: int, d_out: int, x: torch.Tensor) -> torch.Tensor:
    """out: [T, d_out], dtype and device of x, unit last-dim stride; allocated when None."""
    if out is None:
        return torch.empty(num_tokens, d_out, dtype=x.dtype, device=x.device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (num_tokens, d_out):
        raise KernelArgumentError(f"out must have shape [{num_tokens}, {d_out}], got {_describe(out)}")
    if out.dtype != x.dtype or out.device != x.device:
        raise KernelArgumentError(f"out is {out.dtype} on {out.device}; expected {x.dtype} on {x.device}")
    if d_out > 1 and out.stride(1) != 1:
        raise KernelArgumentError(f"out must have unit stride in its last dim, got strides {out.stride()}")
    if out.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise KernelArgumentError("out must not share memory with x (kernels read x while writing out)")
    return out


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {list(value.shape)} ({value.dtype})"
    return type(value).__name__
