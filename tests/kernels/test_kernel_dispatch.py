"""Backend selection by device and TRITON_INTERPRET, and the torch-only import (no triton, Ray, Redis)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from lorafleet.kernels import lora_delta, select_backend
from lorafleet.kernels.synthetic import make_adapter_batch
from lorafleet.kernels.triton_runtime import is_triton_available


def test_cpu_defaults_to_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert select_backend(torch.device("cpu")) == "torch"
    assert select_backend(torch.device("cpu"), "reference") == "reference"


def test_interpreter_forces_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(torch.device("cpu")) == ("triton" if is_triton_available() else "torch")


@pytest.mark.skipif(not is_triton_available(), reason="triton is not installed")
def test_cuda_defaults_to_triton():
    assert select_backend(torch.device("cuda")) == "triton"


@pytest.mark.skipif(torch.cuda.is_available() or not is_triton_available(), reason="needs a CPU-only box")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b = make_adapter_batch(2, 8, 8, [2])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lora_delta(b.x, b.in_rows, b.out_rows, b.token_start, b.token_rank, backend="triton")


def test_imports_and_runs_with_only_torch():
    # The GPU box may lack triton; the package must still import and fall back to the torch path.
    code = textwrap.dedent("""
        import sys
        for name in ("triton", "ray", "redis", "pydantic", "rich"):
            sys.modules[name] = None  # makes `import name` raise ImportError
        import torch
        from lorafleet.kernels import flora_linear, select_backend
        assert select_backend(torch.device("cpu")) == "torch"
        x = torch.randn(3, 8)
        y = flora_linear(x, torch.eye(8), torch.ones(2, 8), torch.ones(2, 8), [0, 0, 0], [1, 0, 2])
        assert torch.allclose(y, x * torch.tensor([[1.0], [1.0], [2.0]]))
        from lorafleet.benchmarks.kernels_report import print_report  # rich is optional too
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
