"""Every Triton launch the kernels make, compiled ahead of time for an H100/H200 (sm_90) on this CPU machine: the
launch arguments come from the real launchers (recorded, not run), the compile is Triton's own through ptxas, so a
kernel that the interpreter runs but the GPU compiler rejects (shapes, dtypes, constexpr branches) fails in CI."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from lorafleet.kernels import plan_adapter_batch, triton_flora, triton_sgmv
from lorafleet.kernels.synthetic import make_adapter_batch
from lorafleet.kernels.triton_runtime import dot_flags, is_triton_available

pytestmark = pytest.mark.skipif(not is_triton_available(), reason="triton is not installed")
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    """Stands in for a jitted kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    launches: list[tuple] = []

    def __init__(self, fn) -> None:
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _spec(fn, args: tuple, kwargs: dict) -> dict:
    """What triton.compile needs for one launch: the kernel's name, its signature, constexprs and options."""
    names = list(inspect.signature(fn).parameters)
    consts = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    signature = {}
    for name, value in zip(names, args):
        signature[name] = "*" + TYPES[value.dtype] if isinstance(value, torch.Tensor) else "i32"
    signature |= {name: "constexpr" for name in consts}
    assert set(signature) == set(names), f"{fn.__name__}: launch does not bind {set(names) - set(signature)}"
    signature = {name: signature[name] for name in names}   # the kernel's parameter order
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": consts,
            "options": {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}}


# Run in a fresh interpreter: this test process imported triton for its CPU interpreter (conftest), after which
# Triton's compiler refuses to build (its standard library is then interpreted functions).
COMPILER = """
import importlib, inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sizes = []
for spec in json.load(sys.stdin):
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    names = list(inspect.signature(fn).parameters)
    source = ASTSource(fn=triton.jit(fn), signature=spec["signature"],
                       constexprs={(names.index(k),): v for k, v in spec["constexprs"].items()})
    sizes.append(len(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec["options"]).asm["cubin"]))
print(json.dumps(sizes))
"""


def _compile_all(specs: list[dict]) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILER], input=json.dumps(specs), capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture
def recorded(monkeypatch):
    try:
        import triton.backends.nvidia  # noqa: F401  (ptxas ships inside it)
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    monkeypatch.setattr(triton_sgmv, "jit", _Recorder)
    monkeypatch.setattr(triton_flora, "jit", _Recorder)
    monkeypatch.setattr(_Recorder, "launches", [])
    return _Recorder.launches


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_launch_compiles_for_sm90(recorded, dtype):
    # decode (3 tokens) and prefill-sized (70 tokens) batches of mixed ranks 0-200: every SGMV mode (fused,
    # split-K shrink, expand), every FLoRA rank class and the merged FLoRA kernel
    for tokens in (3, 70):
        b = make_adapter_batch(tokens, 4096, 1024, [0, 4, 16, 64, 200], popularity="uniform", dtype=dtype)
        plan = plan_adapter_batch(b.token_start, b.token_rank, b.token_scale)
        out = torch.empty(tokens, 1024, dtype=dtype)
        for split in (False, True):
            triton_sgmv.lora_delta_triton(b.x, b.in_rows, b.out_rows, plan, out, True, split=split)
        triton_sgmv.lora_delta_triton(b.x, b.in_rows, b.out_rows, plan, out, False)
        triton_flora.flora_linear_triton(b.x, b.weight, b.in_rows, b.out_rows, plan, out)
    modes = {(fn.__name__, kw.get("SHRINK"), kw.get("EXPAND")) for fn, _, kw in recorded}
    assert {("_sgmv_kernel", True, True), ("_sgmv_kernel", True, False), ("_sgmv_kernel", False, True),
            ("_flora_expanded_kernel", None, None), ("_flora_merged_kernel", None, None)} <= modes
    assert all(kw["PRECISION"] == dot_flags(dtype)["PRECISION"] for _, _, kw in recorded)
    specs = {json.dumps(spec, sort_keys=True): spec for spec in (_spec(*launch) for launch in recorded)}
    sizes = _compile_all(list(specs.values()))
    assert len(sizes) >= 5 and all(size > 0 for size in sizes)   # a cubin for every distinct launch
