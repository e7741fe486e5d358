"""Kernel test fixtures: backends (Triton through its interpreter on CPU), device, per-dtype error bounds."""

from collections.abc import Callable

import pytest
import torch

from lorafleet.kernels.triton_runtime import is_triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Max-abs error relative to the float64 reference's max-abs, per dtype (one rounding of the operands
# plus fp32 accumulation; bf16 has 8 mantissa bits).
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton on this machine: compiled on CUDA, else the interpreter (env set for this test only)."""
    if not is_triton_available():
        pytest.skip("triton is not installed")
    if DEVICE.type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "triton":
        request.getfixturevalue("interpret")
    return request.param


@pytest.fixture
def check_close() -> Callable[[torch.Tensor, torch.Tensor, torch.dtype], None]:
    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        assert actual.shape == expected.shape
        assert torch.isfinite(actual).all(), "non-finite output: an element was never written"
        scale = expected.double().abs().max().clamp_min(1e-6)
        error = ((actual.double() - expected.double().to(actual.device)).abs().max() / scale).item()
        assert error <= REL_TOL[dtype], f"relative error {error:.2e} > {REL_TOL[dtype]:.0e} for {dtype}"

    return check


@pytest.fixture
def poisoned() -> Callable[[int, int, torch.dtype], torch.Tensor]:
    """An out= tensor full of NaN, so any element a kernel forgets to write fails check_close."""
    return lambda rows, cols, dtype: torch.full((rows, cols), float("nan"), dtype=dtype, device=DEVICE)


@pytest.fixture
def check_same(backend: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Two forms of one call agree bit for bit, except the torch backend on CUDA, whose index_add_ sums with
    atomics (order, hence rounding, varies run to run): there within a few fp32 ulps."""
    def check(actual: torch.Tensor, expected: torch.Tensor) -> None:
        if DEVICE.type == "cuda" and backend == "torch":
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(actual, expected)

    return check
