"""Optional Triton: lazy import, interpreter detection, kernels jitted on first use per interpreter mode."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch


@functools.cache
def is_triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def is_interpreting() -> bool:
    """TRITON_INTERPRET=1 runs kernels in Triton's numpy interpreter (CPU tensors, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _jit(fn: Callable[..., Any], interpret: bool) -> Any:
    # triton.jit reads TRITON_INTERPRET when it decorates, so decorating lazily (and once per mode) lets a
    # test switch the interpreter on for a block without re-importing this package.
    import triton

    del interpret  # only part of the cache key
    return triton.jit(fn)


def jit(fn: Callable[..., Any]) -> Any:
    """The Triton-compiled (or interpreted, under TRITON_INTERPRET=1) form of a plain kernel function."""
    return _jit(fn, is_interpreting())


def dot_flags(dtype: torch.dtype) -> dict[str, Any]:
    """Constexprs every kernel takes for its tl.dot calls.

    UPCAST: the Triton 3.x interpreter multiplies bfloat16 operands as raw uint16 bits, so interpreted
    bf16 kernels cast dot operands to fp32 (compiled kernels keep native bf16 tensor-core dots).
    PRECISION: fp32 inputs use exact "ieee" dots, matching torch's default of no TF32; None elsewhere.
    """
    return {
        "UPCAST": is_interpreting() and dtype == torch.bfloat16,
        "PRECISION": "ieee" if dtype == torch.float32 else None,
    }


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; the interpreter gets a small number so tests stay quick."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def check_triton_device(device: torch.device) -> None:
    if not is_triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if device.type != "cuda" and not is_interpreting():
        raise RuntimeError(f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
                           "(Triton's interpreter); use backend='torch' for the CPU path")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(value: int) -> int:
    return 1 << (value - 1).bit_length()
