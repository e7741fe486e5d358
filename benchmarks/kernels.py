"""Kernel benchmark (issue 4): base GEMM vs FLoRA, base + SGMV delta, base + bmm; mixed vs padded ranks."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lorafleet.benchmarks.timing import bench, statistic
from lorafleet.kernels.ops import flora_linear, lora_bmm, lora_delta, select_backend
from lorafleet.kernels.plan import plan_adapter_batch
from lorafleet.kernels.synthetic import SyntheticAdapters, make_adapter_batch, pad_to_rank

SHAPES: dict[str, tuple[int, int]] = {"tiny": (64, 64), "4096x4096": (4096, 4096), "4096x11008": (4096, 11008)}
TOKEN_COUNTS = (1, 16, 64, 256)
RANKS = (1, 2, 4, 8, 16, 64)
MIXED_RANKS = (8, 128)  # half the tokens each; compared with the same batch padded to 128
# FLoRA includes the base GEMM by construction; the SGMV delta is timed alone so the base GEMM does not
# dilute what rank heterogeneity costs.
MIXED_OPS = ("flora", "delta")
# CPU quick mode: ~1-2 minutes on 2 cores. FLoRA's cost grows with rank x tokens, so high ranks at
# large T dominate a CPU run; the full grid is meant for a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"shapes": tuple(SHAPES), "token_counts": TOKEN_COUNTS, "ranks": RANKS, "repeats": 20, "warmup": 3},
    "quick": {"shapes": tuple(SHAPES), "token_counts": (1, 16), "ranks": (1, 4, 16), "repeats": 7, "warmup": 1},
}


def _linear(batch: SyntheticAdapters, y: torch.Tensor) -> torch.Tensor:
    return torch.matmul(batch.x, batch.weight.T, out=y)


def _ops(batch: SyntheticAdapters, device: torch.device) -> dict[str, Callable[[], object]]:
    """The timed calls; the plan is built once outside them, as the engine does once per step."""
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, batch.token_scale, device=device)
    args = (batch.x, batch.in_rows, batch.out_rows)
    y = torch.empty(batch.num_tokens, batch.weight.shape[0], dtype=batch.x.dtype, device=device)
    tmp = torch.empty_like(y)
    return {
        "base": lambda: _linear(batch, y),
        "flora": lambda: flora_linear(batch.x, batch.weight, batch.in_rows, batch.out_rows, plan=plan, out=y),
        "base+delta": lambda: lora_delta(*args, plan=plan, out=_linear(batch, y), accumulate=True),
        "base+bmm": lambda: _linear(batch, y).add_(lora_bmm(*args, plan=plan, out=tmp)),
        "delta": lambda: lora_delta(*args, plan=plan, out=tmp),
    }


def _bytes(batch: SyntheticAdapters) -> tuple[int, int]:
    """(base GEMM bytes, adapter rows actually used): the memory floor that GB/s is read against."""
    size = batch.x.element_size()
    d_out, d_in = batch.weight.shape
    base = (batch.num_tokens * (d_in + d_out) + d_in * d_out) * size
    return base, int(batch.token_rank.sum()) * (d_in + d_out) * size


def _grid_point(shape: str, num_tokens: int, rank: int, device: torch.device, dtype: torch.dtype,
                timing: dict[str, int]) -> dict[str, Any]:
    d_in, d_out = SHAPES[shape]
    batch = make_adapter_batch(num_tokens, d_in, d_out, [rank], dtype=dtype, device=device, seed=rank)
    ops = _ops(batch, device)
    del ops["delta"]  # the grid reports base + delta, as a layer runs it
    seconds = bench(ops, device=device, **timing)
    base_bytes, adapter_bytes = _bytes(batch)
    plan_s = bench({"plan": lambda: plan_adapter_batch(batch.token_start, batch.token_rank, batch.token_scale,
                                                       device=device)}, device=device, **timing)["plan"]
    return {
        "shape": shape, "d_in": d_in, "d_out": d_out, "tokens": num_tokens, "rank": rank,
        "ms": {name: s * 1e3 for name, s in seconds.items()},
        "ratio_to_base": {name: s / seconds["base"] for name, s in seconds.items() if name != "base"},
        "flora_speedup_vs_bmm": seconds["base+bmm"] / seconds["flora"],
        "gbps": {name: (base_bytes + (adapter_bytes if name != "base" else 0)) / s / 1e9
                 for name, s in seconds.items()},
        "base_gflops": 2 * num_tokens * d_in * d_out / seconds["base"] / 1e9,
        "plan_ms": plan_s * 1e3,
    }


def _mixed_point(shape: str, num_tokens: int, device: torch.device, dtype: torch.dtype,
                 timing: dict[str, int]) -> list[dict[str, Any]]:
    d_in, d_out = SHAPES[shape]
    mixed = make_adapter_batch(num_tokens, d_in, d_out, MIXED_RANKS, dtype=dtype, device=device, seed=0)
    padded = pad_to_rank(mixed, max(MIXED_RANKS))
    mixed_ops, padded_ops = _ops(mixed, device), _ops(padded, device)
    fns = {}
    for op in MIXED_OPS:
        fns[f"{op} mixed"], fns[f"{op} padded"] = mixed_ops[op], padded_ops[op]
    seconds = bench(fns, device=device, **timing)
    return [{"shape": shape, "tokens": num_tokens, "op": op, "mixed_ms": seconds[f"{op} mixed"] * 1e3,
             "padded_ms": seconds[f"{op} padded"] * 1e3,
             "speedup": seconds[f"{op} padded"] / seconds[f"{op} mixed"]} for op in MIXED_OPS]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, torch on {torch.get_num_threads()} threads"


def run_kernel_bench(
    shapes: Sequence[str] | None = None,
    token_counts: Sequence[int] | None = None,
    ranks: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    repeats: int | None = None,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time the issue-4 grid (every token its own adapter) and the mixed-rank batch; return plain data.

    Defaults: the "quick" or "full" preset; CUDA if present else CPU; float16 on CUDA, float32 on CPU.
    Runs on torch's current CPU threads (the caller sets them: `lorafleet bench kernels --threads N`).
    """
    preset = PRESETS["quick" if quick else "full"]
    shapes = tuple(shapes or preset["shapes"])
    token_counts = tuple(token_counts or preset["token_counts"])
    ranks = tuple(ranks or preset["ranks"])
    timing = {"repeats": repeats or preset["repeats"], "warmup": preset["warmup"]}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    say = progress or (lambda _: None)
    load_before = _load_average()

    grid, mixed = [], []
    with torch.inference_mode():
        for shape in shapes:
            for num_tokens in token_counts:
                for rank in ranks:
                    say(f"{shape} T={num_tokens} rank={rank}")
                    grid.append(_grid_point(shape, num_tokens, rank, device, dtype, timing))
                if num_tokens >= 2:
                    say(f"{shape} T={num_tokens} mixed ranks {MIXED_RANKS}")
                    mixed.extend(_mixed_point(shape, num_tokens, device, dtype, timing))
    try:
        import triton
        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device), "device_type": device.type, "dtype": str(dtype).removeprefix("torch."),
        "backend": select_backend(device), "triton": triton_version, "quick": quick,
        "repeats": timing["repeats"], "warmup": timing["warmup"], "statistic": statistic(device),
        "mixed_ranks": list(MIXED_RANKS),
        "grid": grid, "mixed": mixed,
        "load_average": {"before": load_before, "after": _load_average()},  # CPU runs share the machine
    }


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
