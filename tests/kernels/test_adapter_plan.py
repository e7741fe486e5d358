"""AdapterBatchPlan: segment invariants, rank groups, host copies, errors, empty batches."""

import pytest
import torch

from lorafleet.kernels import KernelArgumentError, flora_linear, lora_delta, plan_adapter_batch
from lorafleet.kernels.plan import FLORA_MERGE_MIN_ROWS, ragged_arange, segment_positions
from lorafleet.kernels.synthetic import POPULARITY, make_adapter_batch


@pytest.mark.parametrize("popularity", POPULARITY)
def test_segments_partition_the_sorted_tokens(popularity):
    batch = make_adapter_batch(33, 8, 8, [0, 1, 2, 4, 8, 16, 64, 128], popularity=popularity)
    plan = plan_adapter_batch(batch.token_start, batch.token_rank, batch.token_scale)
    assert sorted(plan.order.tolist()) == list(range(33))
    offsets = plan.seg_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == 33
    keys = []
    for index, seg in enumerate(plan.segments):
        assert (seg.lo, seg.hi) == (offsets[index], offsets[index + 1])
        assert (seg.start, seg.rank) == (plan.seg_start[index].item(), plan.seg_rank[index].item())
        tokens = plan.order[seg.lo:seg.hi]
        assert (batch.token_rank[tokens] == seg.rank).all()
        if seg.rank:
            assert (batch.token_start[tokens] == seg.start).all()
            assert torch.allclose(batch.token_scale[tokens], torch.tensor(seg.scale))
        keys.append((seg.rank, seg.start, seg.scale))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert plan.max_rank == int(batch.token_rank.max())
    assert plan.num_pool_rows_used == int((batch.token_start + batch.token_rank).max())


def test_rank_groups_and_base_tokens():
    plan = plan_adapter_batch([5, 0, 9, 5, 3, 7], [2, 0, 4, 2, 0, 4], [1.0, 1.0, 0.5, 1.0, 2.0, 0.5])
    assert [(g.rank, g.tok_hi - g.tok_lo) for g in plan.rank_groups] == [(0, 2), (2, 2), (4, 2)]
    assert plan.num_base_tokens == 2
    base = plan.segments[0]
    assert (base.rank, base.start, base.scale, base.num_tokens) == (0, 0, 0.0, 2)  # normalised, one segment
    assert plan.token_start.tolist() == [5, 0, 9, 5, 0, 7]
    assert plan.num_segments == 4


def test_tokens_of_one_slot_with_different_scales_split():
    plan = plan_adapter_batch([0, 0, 0], [4, 4, 4], [1.0, 2.0, 1.0])
    assert [(s.scale, s.num_tokens) for s in plan.segments] == [(1.0, 2), (2.0, 1)]


def test_merge_rule():
    plan = plan_adapter_batch([0] * 8 + [16], [16] * 8 + [64])
    assert [s.is_flora_merged for s in plan.segments] == [FLORA_MERGE_MIN_ROWS <= 8 * 16, False]


def test_empty_batch_is_allowed(device):
    plan = plan_adapter_batch([], [], device=device)
    assert plan.num_tokens == 0 and plan.segments == () and plan.max_rank == 0
    x = torch.empty(0, 8, device=device)
    pool = torch.zeros(4, 8, device=device)
    assert flora_linear(x, torch.zeros(8, 8, device=device), pool, pool, plan=plan).shape == (0, 8)
    assert lora_delta(x, pool, pool, plan=plan).shape == (0, 8)


def test_plan_to_device_and_derived_cache(device):
    plan = plan_adapter_batch(torch.tensor([0, 4]), torch.tensor([4, 4]))
    assert plan.device.type == "cpu"
    moved = plan.to(device)
    assert moved.order.device.type == device.type and moved.segments == plan.segments
    calls = []
    assert plan.derive("k", lambda p: calls.append(p) or 1) == 1
    assert plan.derive("k", lambda p: calls.append(p) or 2) == 1 and len(calls) == 1


def test_plan_on_another_device_is_rejected():
    plan = plan_adapter_batch([0], [1], device="meta")
    x = torch.zeros(1, 4)
    with pytest.raises(KernelArgumentError, match="plan is on meta"):
        lora_delta(x, torch.zeros(2, 4), torch.zeros(2, 4), plan=plan)


@pytest.mark.parametrize(("start", "rank", "message"), [
    ([0, -1], [1, 1], "token_start must be >= 0"),
    ([0, 1], [1, -2], "token_rank must be >= 0"),
    ([0, 1], [1], "must all have length"),
    ([[0, 1]], [[1, 1]], "must be 1-D"),
])
def test_bad_token_arrays(start, rank, message):
    with pytest.raises(KernelArgumentError, match=message):
        plan_adapter_batch(torch.tensor(start), torch.tensor(rank))


def test_ragged_helpers():
    owner, offset = ragged_arange(torch.tensor([2, 0, 3]))
    assert owner.tolist() == [0, 0, 2, 2, 2] and offset.tolist() == [0, 1, 0, 1, 2]
    plan = plan_adapter_batch([0, 8, 0], [4, 2, 4])
    assert segment_positions(plan.segments[1:]).tolist() == [1, 2]
