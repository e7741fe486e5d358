"""BaseLinear (the base GEMM; oneDNN with prepacked weights on a CPU) against the float64 product."""

import pytest
import torch

from lorafleet.kernels import BaseLinear, can_prepack
from lorafleet.kernels.base_linear import prepack_dtypes

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(72, 40), (768, 1280), (2048, 768)]   # odd, the small preset's fused q/k/v, its down_proj


def _needs_prepack(dtype: torch.dtype) -> None:
    if dtype not in prepack_dtypes():
        pytest.skip(f"oneDNN cannot prepack {dtype} on this CPU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 7, 33, 133])
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_prepacked_matches_float64(dtype, num_tokens, d_in, d_out, check_close):
    _needs_prepack(dtype)
    gen = torch.Generator().manual_seed(num_tokens)
    weight = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(dtype)
    x = torch.randn(num_tokens, d_in, generator=gen).to(dtype)
    linear = BaseLinear(weight, prepack=True)
    assert linear.is_prepacked and linear.weight is weight
    check_close(linear(x), x.double() @ weight.double().T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_and_dropped_weight(dtype, check_close):
    """x may be a column view (the attention output, a slice of a fused output); keep_weight=False frees W."""
    _needs_prepack(dtype)
    weight = torch.randn(40, 72).to(dtype)
    wide = torch.randn(9, 100).to(dtype)
    x = wide[:, 10:82]
    linear = BaseLinear(weight, prepack=True, keep_weight=False)
    assert linear.weight is None and (linear.d_out, linear.d_in) == (40, 72)
    check_close(linear(x), x.double() @ weight.double().T, dtype)
    assert linear(x[:0]).shape == (0, 40)


def test_without_prepack_it_is_f_linear():
    weight, x = torch.randn(40, 72, dtype=torch.float64), torch.randn(5, 72, dtype=torch.float64)
    linear = BaseLinear(weight, keep_weight=False)    # nothing else holds W: it is kept
    assert not linear.is_prepacked and linear.weight is weight
    assert torch.equal(linear(x), torch.nn.functional.linear(x, weight))


def test_what_can_be_prepacked():
    assert not can_prepack(torch.zeros(4, 4, dtype=torch.float64))    # oneDNN has no float64 GEMM
    assert not can_prepack(torch.zeros(4))
    assert can_prepack(torch.zeros(4, 4)) == (torch.float32 in prepack_dtypes())
    with pytest.raises(AssertionError, match="cannot prepack"):
        BaseLinear(torch.zeros(4, 4, dtype=torch.float64), prepack=True)
