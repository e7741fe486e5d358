"""flora_linear against the float64 per-token reference: dtypes x odd batch sizes x popularity x backends."""


import pytest
import torch
from lf_testing import KERNEL_D_IN, KERNEL_D_OUT, KERNEL_RANK_MIX, shuffled_ranks

from lorafleet.kernels import (
    KernelArgumentError,
    flora_linear,
    flora_linear_reference,
    plan_adapter_batch,
)
from lorafleet.kernels.synthetic import POPULARITY, SyntheticAdapters, make_adapter_batch

RANK_MIX, D_IN, D_OUT = KERNEL_RANK_MIX, KERNEL_D_IN, KERNEL_D_OUT
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference(batch: SyntheticAdapters) -> torch.Tensor:
    wide = batch.to(torch.float64)
    return flora_linear_reference(wide.x, wide.weight, wide.in_rows, wide.out_rows, batch.token_start,
                                  batch.token_rank)


def run(batch: SyntheticAdapters, out: torch.Tensor, backend: str) -> torch.Tensor:
    y = flora_linear(batch.x, batch.weight, batch.in_rows, batch.out_rows, batch.token_start,
                     batch.token_rank, out=out, backend=backend)
    assert y is out
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 7, 33])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_matches_reference(backend, device, dtype, num_tokens, popularity, check_close, poisoned):
    batch = make_adapter_batch(num_tokens, D_IN, D_OUT, shuffled_ranks(), popularity=popularity,
                               dtype=dtype, device=device)
    y = run(batch, poisoned(num_tokens, D_OUT, dtype), backend)
    check_close(y, reference(batch), dtype)


@pytest.mark.parametrize(("num_tokens", "rank"), [(33, 2), (5, 16), (33, 16), (3, 128), (1, 200), (4, 200)])
def test_one_adapter_batches_incl_merged_path(backend, device, num_tokens, rank, check_close, poisoned):
    # Prefill of one adapter: long segments run as x (W o B A)^T; rank > 128 always does on Triton.
    batch = make_adapter_batch(num_tokens, D_IN, D_OUT, [rank], popularity="identical", device=device)
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, device=device)
    assert plan.segments[0].is_flora_merged == (num_tokens * rank >= 64 and num_tokens >= 2)
    y = run(batch, poisoned(num_tokens, D_OUT, torch.float32), backend)
    check_close(y, reference(batch), torch.float32)


@pytest.mark.parametrize("popularity", ["distinct", "uniform"])
def test_ranks_that_are_not_powers_of_two(backend, device, popularity, check_close, poisoned):
    # Tiles pad ranks to a power of two; the padded lanes must read nothing past each adapter's rows.
    batch = make_adapter_batch(11, D_IN, D_OUT, [3, 5, 0, 12, 100, 1, 7], popularity=popularity,
                               device=device)
    y = run(batch, poisoned(11, D_OUT, torch.float32), backend)
    check_close(y, reference(batch), torch.float32)


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_wide_output_spans_several_column_tiles(backend, device, num_tokens, check_close, poisoned):
    batch = make_adapter_batch(num_tokens, 40, 200, shuffled_ranks(), device=device)
    y = flora_linear(batch.x, batch.weight, batch.in_rows, batch.out_rows, batch.token_start,
                     batch.token_rank, out=poisoned(num_tokens, 200, torch.float32), backend=backend)
    check_close(y, reference(batch), torch.float32)


def test_rank_one_is_ia3(backend, device, check_close):
    # IA3 = FLoRA rank 1 with one side all ones: scale the inputs, or scale the outputs, of x W^T.
    batch = make_adapter_batch(9, D_IN, D_OUT, [1], device=device)
    in_scale, out_scale = batch.in_rows.clone(), batch.out_rows.clone()
    ones_in, ones_out = torch.ones_like(in_scale), torch.ones_like(out_scale)
    rows = batch.token_start.to(device)
    args = (batch.token_start, batch.token_rank)
    y_in = flora_linear(batch.x, batch.weight, in_scale, ones_out, *args, backend=backend)
    y_out = flora_linear(batch.x, batch.weight, ones_in, out_scale, *args, backend=backend)
    check_close(y_in, (batch.x * in_scale[rows]) @ batch.weight.T, torch.float32)
    check_close(y_out, (batch.x @ batch.weight.T) * out_scale[rows], torch.float32)


def test_base_tokens_equal_plain_linear(backend, device):
    batch = make_adapter_batch(6, D_IN, D_OUT, [0], device=device)
    y = flora_linear(batch.x, batch.weight, batch.in_rows, batch.out_rows, batch.token_start,
                     batch.token_rank, backend=backend)
    torch.testing.assert_close(y, batch.x @ batch.weight.T, rtol=1e-5, atol=1e-5)


def test_plan_and_per_token_forms_agree(backend, device, check_same):
    batch = make_adapter_batch(13, D_IN, D_OUT, shuffled_ranks(), popularity="uniform", device=device)
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, device=device)
    by_plan = flora_linear(batch.x, batch.weight, batch.in_rows, batch.out_rows, plan=plan, backend=backend)
    by_tokens = flora_linear(batch.x, batch.weight, batch.in_rows, batch.out_rows, batch.token_start.tolist(),
                             batch.token_rank.tolist(), backend=backend)
    check_same(by_plan, by_tokens)


def test_strided_activations_are_handled(backend, device, check_close):
    batch = make_adapter_batch(5, D_IN, D_OUT, shuffled_ranks(), device=device)
    wide = torch.zeros(5, 2 * D_IN, device=device)
    wide[:, ::2] = batch.x            # last-dim stride 2: copied
    rows = torch.zeros(5, D_IN + 8, device=device)
    rows[:, :D_IN] = batch.x          # row stride D_IN + 8: used in place
    for x in (wide[:, ::2], rows[:, :D_IN]):
        y = flora_linear(x, batch.weight, batch.in_rows, batch.out_rows, batch.token_start,
                         batch.token_rank, backend=backend)
        check_close(y, reference(batch), torch.float32)


def test_default_backend_matches_reference(device, check_close):
    batch = make_adapter_batch(7, D_IN, D_OUT, shuffled_ranks(), device=device)
    y = flora_linear(batch.x, batch.weight, batch.in_rows, batch.out_rows, batch.token_start,
                     batch.token_rank)
    check_close(y, reference(batch), torch.float32)


def test_reference_backend_is_the_spec(device):
    batch = make_adapter_batch(4, D_IN, D_OUT, shuffled_ranks(), device=device).to(torch.float64)
    y = flora_linear(batch.x, batch.weight, batch.in_rows, batch.out_rows, batch.token_start,
                     batch.token_rank, backend="reference")
    assert torch.equal(y, reference(batch))


def test_rejects_bad_arguments(device):
    b = make_adapter_batch(4, D_IN, D_OUT, [4], device=device)
    args = (b.token_start, b.token_rank)
    cases = {
        "x has dtype": lambda: flora_linear(b.x.long(), b.weight, b.in_rows, b.out_rows, *args),
        "weight has dtype": lambda: flora_linear(b.x, b.weight.half(), b.in_rows, b.out_rows, *args),
        "weight has shape": lambda: flora_linear(b.x, b.weight[:, :-1], b.in_rows, b.out_rows, *args),
        "weight must have unit stride": lambda: flora_linear(b.x, b.weight.T.contiguous().T, b.in_rows,
                                                             b.out_rows, *args),
        "in_rows has shape": lambda: flora_linear(b.x, b.weight, b.in_rows[:, :-1], b.out_rows, *args),
        "out_rows has shape": lambda: flora_linear(b.x, b.weight, b.in_rows, b.out_rows[:-1], *args),
        "pools have": lambda: flora_linear(b.x, b.weight, b.in_rows[:2], b.out_rows[:2], *args),
        "x has T=4": lambda: flora_linear(b.x, b.weight, b.in_rows, b.out_rows, args[0][:3], args[1][:3]),
        "out must have shape": lambda: flora_linear(b.x, b.weight, b.in_rows, b.out_rows, *args,
                                                    out=torch.empty(4, D_OUT + 1, device=device)),
        "not both": lambda: flora_linear(b.x, b.weight, b.in_rows, b.out_rows, *args,
                                         plan=plan_adapter_batch(*args, device=device)),
        "token_rank must be >= 0": lambda: flora_linear(b.x, b.weight, b.in_rows, b.out_rows, args[0], -args[1]),
        "backend must be": lambda: flora_linear(b.x, b.weight, b.in_rows, b.out_rows, *args, backend="cuda"),
        "pass token_start": lambda: flora_linear(b.x, b.weight, b.in_rows, b.out_rows),
    }
    for message, call in cases.items():
        with pytest.raises(KernelArgumentError, match=message):
            call()


def test_triton_rejects_float64(interpret, device):
    b = make_adapter_batch(2, D_IN, D_OUT, [4], device=device).to(torch.float64)
    with pytest.raises(KernelArgumentError, match="float64"):
        flora_linear(b.x, b.weight, b.in_rows, b.out_rows, b.token_start, b.token_rank, backend="triton")
