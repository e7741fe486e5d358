"""Each CPU strategy of lora_delta (dense masked GEMMs, gathered matvecs in token or segment order, per-segment
loop) forced on its own, against the float64 reference, writing into plain and column-view outputs."""

import pytest
import torch
from lf_testing import KERNEL_D_IN, KERNEL_D_OUT, shuffled_ranks

from lorafleet.kernels import lora_delta, lora_delta_reference, plan_adapter_batch
from lorafleet.kernels import torch_sgmv as sgmv
from lorafleet.kernels.synthetic import POPULARITY, SyntheticAdapters, make_adapter_batch

D_IN, D_OUT = KERNEL_D_IN, KERNEL_D_OUT
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
STRATEGIES = {
    # name: (module settings, which layout fields must be non-empty)
    "dense": ({"DENSE_DTYPES": DTYPES, "DENSE_MAX_ELEMENTS": 1 << 40}, "dense"),
    "gathered": ({"DENSE_DTYPES": (), "LOOP_MIN_TOKENS": 1 << 20, "GATHER_MAX_ELEMENTS": 1 << 40}, "gathered"),
    "looped": ({"DENSE_DTYPES": (), "LOOP_MIN_TOKENS": 0}, "looped"),
}


def reference(batch: SyntheticAdapters) -> torch.Tensor:
    wide = batch.to(torch.float64)
    return lora_delta_reference(wide.x, wide.in_rows, wide.out_rows, batch.token_start, batch.token_rank,
                                batch.token_scale)


@pytest.fixture(params=list(STRATEGIES))
def strategy(request, monkeypatch) -> str:
    settings, _ = STRATEGIES[request.param]
    for name, value in settings.items():
        monkeypatch.setattr(sgmv, name, value)
    return request.param


def _layout(plan, batch: SyntheticAdapters) -> sgmv.SgmvTorchLayout:
    [layout] = [v for k, v in plan.derived.items() if k.startswith("torch_sgmv/")]
    return layout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 7, 33])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_each_strategy_matches_reference(strategy, dtype, num_tokens, popularity, check_close):
    batch = make_adapter_batch(num_tokens, D_IN, D_OUT, shuffled_ranks(), popularity=popularity, dtype=dtype)
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, batch.token_scale)
    wide = torch.full((num_tokens, D_OUT + 30), float("nan"), dtype=dtype)
    wide[:, 10:10 + D_OUT] = 0.5
    out = wide[:, 10:10 + D_OUT]                       # a column view, as in a fused q/k/v output
    assert lora_delta(batch.x, batch.in_rows, batch.out_rows, plan=plan, out=out, accumulate=True,
                      backend="torch") is out
    check_close(out, reference(batch) + 0.5, dtype)
    assert wide[:, :10].isnan().all() and wide[:, 10 + D_OUT:].isnan().all(), "wrote outside its columns"
    layout = _layout(plan, batch)
    if plan.max_rank:
        assert getattr(layout, STRATEGIES[strategy][1]), f"{strategy} was not used"
    fresh = lora_delta(batch.x, batch.in_rows, batch.out_rows, plan=plan, backend="torch")   # overwrite form
    check_close(fresh, reference(batch), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_of_distinct_adapters_runs_in_token_order(dtype, monkeypatch, check_close):
    """Every token its own short segment: the gathered group keeps x and out in token order."""
    monkeypatch.setattr(sgmv, "DENSE_DTYPES", ())
    batch = make_adapter_batch(9, D_IN, D_OUT, [8], popularity="distinct", dtype=dtype)
    plan = plan_adapter_batch(batch.token_start.flip(0), batch.token_rank, batch.token_scale.flip(0))
    flipped = SyntheticAdapters(batch.x, batch.weight, batch.in_rows, batch.out_rows, batch.token_start.flip(0),
                                batch.token_rank, batch.token_scale.flip(0))
    out = lora_delta(batch.x, batch.in_rows, batch.out_rows, plan=plan, backend="torch")
    check_close(out, reference(flipped), dtype)
    [group] = _layout(plan, batch).gathered
    assert group.is_every_token and torch.equal(group.tokens, torch.arange(9))


def test_dense_group_shares_rows_of_one_adapter_across_scales():
    """Two segments of one adapter with different scales (two requests, two scalings) use its rows once."""
    batch = make_adapter_batch(4, D_IN, D_OUT, [4], popularity="identical", dtype=torch.bfloat16)
    scale = torch.tensor([1.0, 2.0, 1.0, 2.0])
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, scale)
    layout = sgmv.sgmv_torch_layout(plan, is_dense=True, gathered_ranks=())
    assert layout.dense is not None and layout.dense.rows.numel() == 4
    assert torch.equal(layout.dense.mask.sum(1), 4 * scale)


@pytest.mark.parametrize("max_elements,is_dense", [(33 * 33 * 8 * (D_IN + D_OUT), True),
                                                   (33 * 33 * 8 * (D_IN + D_OUT) - 1, False)])
def test_dense_is_bounded(monkeypatch, max_elements, is_dense):
    """Past DENSE_MAX_ELEMENTS (T x R x (d_in + d_out)) the 16-bit path falls back to gather / loop."""
    batch = make_adapter_batch(33, D_IN, D_OUT, [8], popularity="distinct", dtype=torch.bfloat16)
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, batch.token_scale)
    monkeypatch.setattr(sgmv, "DENSE_MAX_ELEMENTS", max_elements)
    lora_delta(batch.x, batch.in_rows, batch.out_rows, plan=plan, backend="torch")
    layout = _layout(plan, batch)
    assert (layout.dense is not None) == is_dense and bool(layout.gathered) != is_dense


def test_modules_of_two_widths_share_one_layout():
    """q (768 + 768) and v (768 + 256) of a rank-8 decode batch: one layout built per step, not one per width."""
    batch = make_adapter_batch(8, 768, 768, [8], popularity="distinct")
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, batch.token_scale)
    lora_delta(batch.x, batch.in_rows, batch.out_rows, plan=plan, backend="torch")
    lora_delta(batch.x, batch.in_rows, batch.out_rows[:, :256].contiguous(), plan=plan, backend="torch")
    assert sum(k.startswith("torch_sgmv/") for k in plan.derived) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_looped_segments_of_consecutive_tokens_use_views(dtype, accumulate, monkeypatch, check_close):
    # a decode batch of two adapters, each over a run of consecutive rows (base rows between them): the looped
    # path takes those runs as slices (x and out as views, the scale inside addmm_ when accumulating)
    monkeypatch.setattr(sgmv, "DENSE_DTYPES", ())
    g = torch.Generator().manual_seed(7)
    x, in_rows, out_rows = (torch.randn(n, d, generator=g).to(dtype) for n, d in ((20, D_IN), (20, D_IN), (20, D_OUT)))
    start = torch.tensor([0] * 12 + [16] * 8)            # pool rows 0..15: a rank-16 adapter; 16..19: rank 4
    rank = torch.tensor([16] * 8 + [0] * 4 + [4] * 8)    # rows 8..11: base rows between the two runs
    scale = torch.tensor([0.5] * 12 + [2.0] * 8)
    plan = plan_adapter_batch(start, rank, scale)
    layout = sgmv.sgmv_torch_layout(plan, False, ())
    assert [tokens for _, tokens in layout.looped] == [slice(12, 20), slice(0, 8)]   # sorted by rank
    base = torch.randn(20, D_OUT, generator=g).to(dtype)
    out = base.clone() if accumulate else torch.full((20, D_OUT), float("nan"), dtype=dtype)
    lora_delta(x, in_rows, out_rows, plan=plan, out=out, accumulate=accumulate, backend="torch")
    expected = lora_delta_reference(x.double(), in_rows.double(), out_rows.double(), start, rank, scale)
    check_close(out, expected + (base.double() if accumulate else 0), dtype)
