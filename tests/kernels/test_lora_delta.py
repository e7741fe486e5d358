"""lora_delta (SGMV) and the lora_bmm baseline against the float64 per-token reference."""


import pytest
import torch
from lf_testing import KERNEL_D_IN, KERNEL_D_OUT, KERNEL_RANK_MIX, shuffled_ranks

from lorafleet.kernels import KernelArgumentError, lora_bmm, lora_delta, lora_delta_reference, plan_adapter_batch
from lorafleet.kernels.synthetic import POPULARITY, SyntheticAdapters, make_adapter_batch

RANK_MIX, D_IN, D_OUT = KERNEL_RANK_MIX, KERNEL_D_IN, KERNEL_D_OUT
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference(batch: SyntheticAdapters) -> torch.Tensor:
    wide = batch.to(torch.float64)
    return lora_delta_reference(wide.x, wide.in_rows, wide.out_rows, batch.token_start, batch.token_rank,
                                batch.token_scale)


def token_args(batch: SyntheticAdapters) -> tuple[torch.Tensor, ...]:
    return batch.x, batch.in_rows, batch.out_rows, batch.token_start, batch.token_rank, batch.token_scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 7, 33])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_matches_reference(backend, device, dtype, num_tokens, popularity, check_close, poisoned):
    batch = make_adapter_batch(num_tokens, D_IN, D_OUT, shuffled_ranks(), popularity=popularity,
                               dtype=dtype, device=device)
    out = poisoned(num_tokens, D_OUT, dtype)
    assert lora_delta(*token_args(batch), out=out, backend=backend) is out
    check_close(out, reference(batch), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulates_onto_the_base_output(backend, device, dtype, check_close):
    # The base-plus-adapter form the engine uses: y = x W^T, then y += delta in the same kernel.
    batch = make_adapter_batch(33, D_IN, D_OUT, shuffled_ranks(), popularity="skewed", dtype=dtype,
                               device=device)
    y = batch.x @ batch.weight.T
    expected = y.double() + reference(batch)
    lora_delta(*token_args(batch), out=y, accumulate=True, backend=backend)
    check_close(y, expected, dtype)


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_wide_layer_loops_over_k_and_splits_columns(backend, device, num_tokens, check_close, poisoned):
    batch = make_adapter_batch(num_tokens, 300, 300, shuffled_ranks(), device=device)
    out = poisoned(num_tokens, 300, torch.float32)
    check_close(lora_delta(*token_args(batch), out=out, backend=backend), reference(batch), torch.float32)


@pytest.mark.parametrize("popularity", ["distinct", "uniform"])
def test_ranks_that_are_not_powers_of_two(backend, device, popularity, check_close, poisoned):
    batch = make_adapter_batch(11, D_IN, D_OUT, [3, 5, 0, 12, 100, 1, 7], popularity=popularity,
                               device=device)
    out = poisoned(11, D_OUT, torch.float32)
    check_close(lora_delta(*token_args(batch), out=out, backend=backend), reference(batch), torch.float32)


@pytest.mark.parametrize("rank", [1, 3, 16, 100, 256])
def test_one_adapter_prefill(backend, device, rank, check_close, poisoned):
    batch = make_adapter_batch(40, D_IN, D_OUT, [rank], popularity="identical", device=device)
    out = poisoned(40, D_OUT, torch.float32)
    check_close(lora_delta(*token_args(batch), out=out, backend=backend), reference(batch), torch.float32)


def test_base_only_batch_is_zero(backend, device, poisoned):
    batch = make_adapter_batch(5, D_IN, D_OUT, [0], device=device)
    out = poisoned(5, D_OUT, torch.float32)
    assert torch.equal(lora_delta(*token_args(batch), out=out, backend=backend), torch.zeros_like(out))


def test_scale_is_per_token(backend, device, check_close):
    batch = make_adapter_batch(6, D_IN, D_OUT, [8], popularity="identical", device=device)
    unit = lora_delta(batch.x, batch.in_rows, batch.out_rows, batch.token_start, batch.token_rank,
                      backend=backend)
    scale = torch.arange(6, dtype=torch.float32)
    scaled = lora_delta(batch.x, batch.in_rows, batch.out_rows, batch.token_start, batch.token_rank, scale,
                        backend=backend)
    check_close(scaled, unit * scale.to(device)[:, None], torch.float32)


def test_plan_and_per_token_forms_agree(backend, device, check_same):
    batch = make_adapter_batch(13, D_IN, D_OUT, shuffled_ranks(), popularity="uniform", device=device)
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, batch.token_scale, device=device)
    by_plan = lora_delta(batch.x, batch.in_rows, batch.out_rows, plan=plan, backend=backend)
    check_same(by_plan, lora_delta(*token_args(batch), backend=backend))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("popularity", POPULARITY)
def test_bmm_baseline_matches_reference(device, dtype, popularity, check_close, poisoned):
    batch = make_adapter_batch(7, D_IN, D_OUT, shuffled_ranks(), popularity=popularity, dtype=dtype,
                               device=device)
    out = poisoned(7, D_OUT, dtype)
    check_close(lora_bmm(*token_args(batch), out=out), reference(batch), dtype)


def test_rejects_bad_arguments(device):
    b = make_adapter_batch(4, D_IN, D_OUT, [4], device=device)
    square = torch.randn(4, D_IN, device=device)
    b = SyntheticAdapters(square, b.weight, b.in_rows, b.out_rows, b.token_start, b.token_rank, b.token_scale)
    cases = {
        "accumulate=True needs out": lambda: lora_delta(*token_args(b), accumulate=True),
        "in_rows has dtype": lambda: lora_delta(b.x, b.in_rows.half(), b.out_rows, b.token_start, b.token_rank),
        "out_rows has shape": lambda: lora_delta(b.x, b.in_rows, b.out_rows[:-1], b.token_start, b.token_rank),
        "token_start, token_rank, token_scale": lambda: lora_delta(*token_args(b)[:5], b.token_scale[:2]),
        "token_scale must be finite": lambda: lora_delta(*token_args(b)[:5], b.token_scale / 0),
        "token_rank must be an integer": lambda: lora_delta(b.x, b.in_rows, b.out_rows, b.token_start,
                                                            b.token_rank.float()),
        "out has dtype|out is": lambda: lora_delta(*token_args(b), out=torch.empty(4, D_OUT, dtype=torch.half,
                                                                                  device=device)),
        "out must have unit stride": lambda: lora_delta(*token_args(b),
                                                        out=torch.empty(D_OUT, 4, device=device).T),
        "out must not share memory with x": lambda: lora_delta(*token_args(b), out=square[:, :D_OUT]),
    }
    for message, call in cases.items():
        with pytest.raises(KernelArgumentError, match=message):
            call()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_triton_fused_and_split_k_paths(interpret, device, dtype, accumulate, split, check_close, poisoned):
    # Both Triton paths, whatever the GPU's size would pick: the fused shrink+expand kernel, and Punica's split-K
    # shrink into fp32 partials then an expand (d_in 300 over several K splits, ranks 0-100 mixed, rank 0 rows).
    from lorafleet.kernels.triton_sgmv import lora_delta_triton

    batch = make_adapter_batch(9, 300, 200, [0, 3, 16, 100, 1], popularity="uniform", dtype=dtype, device=device)
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, batch.token_scale, device=device)
    base = batch.x @ torch.randn(200, 300, dtype=dtype, device=device).T / 300**0.5
    out = base.clone() if accumulate else poisoned(9, 200, dtype)
    lora_delta_triton(batch.x, batch.in_rows, batch.out_rows, plan, out, accumulate, split=split)
    check_close(out, reference(batch) + (base.double() if accumulate else 0), dtype)
