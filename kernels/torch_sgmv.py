"""lora_delta on plain torch (the CPU path): SGMV-style shrink then expand, grouped by rank, no padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .plan import AdapterBatchPlan, Segment, ragged_arange, segment_positions

# By default each segment runs as two small GEMMs on views of its own pool rows (no copies). Short segments
# of small adapters (rank x (d_in + d_out) up to GATHER_MAX_ELEMENTS, e.g. decode on small layers) are
# instead gathered per rank into one batched matvec: there per-call overhead, not bytes, dominates.
# Measured on a 2-core CPU: at 4096 x 4096, rank 8-128, the per-segment loop is 5-10x faster than gathering.
LOOP_MIN_TOKENS = 8
GATHER_MAX_ELEMENTS = 1 << 14
# Cap on gathered adapter rows per batched call (tokens x rank x max(d_in, d_out) elements).
CHUNK_ELEMENTS = 1 << 24
# 16-bit activations: every segment in one masked pair of GEMMs over all T tokens x the R rows of the batch's
# adapters (T x R x (d_in + d_out) up to DENSE_MAX_ELEMENTS), S = (x A^T) o M, delta = S B, M holding each
# token's scale on its own rows. More products than per-segment GEMMs or batched matvecs, but two GEMMs on
# AMX / AVX512-BF16 instead of many small 16-bit calls, which are slow on a CPU. Measured on a Xeon with AMX
# after a GEMM (cold caches), 768 x 768, rank 8, bf16: decode of 32 tokens of 32 adapters 0.20 ms instead of
# 0.28 (batched matvecs); prefill of 32 x 32 tokens of 32 adapters 1.2 ms instead of 2.9 (a loop of segments).
DENSE_DTYPES = (torch.float16, torch.bfloat16)
DENSE_MAX_ELEMENTS = 1 << 29


@dataclass(frozen=True, slots=True)
class GatherGroup:
    """Short-segment tokens of one rank: each gathers its own rank rows from the pools."""

    rank: int
    tokens: torch.Tensor  # [n] int64
    rows: torch.Tensor    # [n * rank] int64, pool rows of each token's adapter, token after token
    offsets: torch.Tensor  # [n] int64: i * rank, where token i's rows start in `rows`
    scales: torch.Tensor  # [n, 1, 1] float32
    scale: float | None   # the one scale of every token (the usual case: one alpha / r per rank), else None
    is_every_token: bool  # tokens = 0 .. T-1 in order (decode of distinct adapters): x and out as they are


@dataclass(frozen=True, slots=True)
class DenseGroup:
    """Every segment at once: the R pool rows of their adapters and the [T, R] scale mask."""

    rows: torch.Tensor    # [R] int64
    mask: torch.Tensor    # [T, R] float32: scale_t on the rows of token t's adapter, else 0


@dataclass(frozen=True, slots=True)
class SgmvTorchLayout:
    base_tokens: torch.Tensor                          # [T0] int64, rank-0 tokens (delta = 0)
    dense: DenseGroup | None
    gathered: tuple[GatherGroup, ...]
    looped: tuple[tuple[Segment, torch.Tensor | slice], ...]   # (segment, its [n] int64 tokens, or their range)


def _dense_group(plan: AdapterBatchPlan, segments: list[Segment]) -> DenseGroup:
    """Rows of each distinct adapter once (segments of one adapter with different scales share them)."""
    device = plan.device
    first_col: dict[tuple[int, int], int] = {}   # (start, rank) -> its first column of the mask
    num_rows = 0
    for seg in segments:
        if (seg.start, seg.rank) not in first_col:
            first_col[(seg.start, seg.rank)] = num_rows
            num_rows += seg.rank
    rows = torch.cat([torch.arange(s, s + r) for s, r in first_col])
    mask = torch.zeros(plan.num_tokens, num_rows, dtype=torch.float32)
    order = plan.order.cpu()
    for seg in segments:
        col = first_col[(seg.start, seg.rank)]
        mask[order[seg.lo:seg.hi, None], torch.arange(col, col + seg.rank)] = seg.scale
    return DenseGroup(rows.to(device), mask.to(device))


def num_adapter_rows(plan: AdapterBatchPlan) -> int:
    """R: pool rows of the plan's distinct adapters (the dense group's width)."""
    return sum({(s.start, s.rank): s.rank for s in plan.segments if s.rank > 0}.values())


def sgmv_torch_layout(plan: AdapterBatchPlan, is_dense: bool, gathered_ranks: tuple[int, ...]) -> SgmvTorchLayout:
    """Split the plan's segments into one dense group (is_dense: all of them), or gathered rank groups (short
    segments of the ranks in gathered_ranks) and looped segments. Modules of different widths share a layout
    when these two agree (q and v of a rank-8 batch)."""
    device = plan.device
    base = [s for s in plan.segments if s.rank == 0]
    if is_dense:
        adapted = [s for s in plan.segments if s.rank > 0]
        return SgmvTorchLayout(plan.order[segment_positions(base).to(device)], _dense_group(plan, adapted), (), ())

    def is_gathered(seg: Segment) -> bool:
        return seg.num_tokens < LOOP_MIN_TOKENS and seg.rank in gathered_ranks

    gathered = []
    for group in plan.rank_groups:
        segs = [s for s in plan.segments[group.seg_lo:group.seg_hi] if is_gathered(s)]
        if not segs:
            continue
        owner, _ = ragged_arange(torch.tensor([s.num_tokens for s in segs], dtype=torch.int64))
        starts = torch.tensor([s.start for s in segs], dtype=torch.int64)[owner]
        scales = torch.tensor([s.scale for s in segs], dtype=torch.float32)[owner]
        tokens = plan.order.cpu()[segment_positions(segs)]
        is_every_token = tokens.numel() == plan.num_tokens
        if is_every_token:   # token order instead of segment order: no gather of x, no scatter into out
            by_token = torch.argsort(tokens)
            tokens, starts, scales = tokens[by_token], starts[by_token], scales[by_token]
        gathered.append(GatherGroup(
            rank=group.rank, tokens=tokens.to(device),
            rows=(starts[:, None] + torch.arange(group.rank)).flatten().to(device),
            offsets=torch.arange(0, tokens.numel() * group.rank, group.rank).to(device),
            scales=scales.view(-1, 1, 1).to(device), is_every_token=is_every_token,
            scale=float(scales[0]) if bool((scales == scales[0]).all()) else None,
        ))
    looped = tuple((s, _as_range(plan.order[s.lo:s.hi])) for s in plan.segments if s.rank > 0 and not is_gathered(s))
    return SgmvTorchLayout(plan.order[segment_positions(base).to(device)], None, tuple(gathered), looped)


def _as_range(tokens: torch.Tensor) -> torch.Tensor | slice:
    """A segment's tokens (increasing: the plan's sorts are stable) as a slice when they are consecutive (a batch of
    one adapter, or its requests admitted together): x and out are then views, with no gather or scatter."""
    n = tokens.numel()
    if n and int(tokens[-1]) - int(tokens[0]) + 1 == n:
        return slice(int(tokens[0]), int(tokens[0]) + n)
    return tokens


def lora_delta_torch(x: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor, plan: AdapterBatchPlan,
                     out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """out[t] (+)= scale_t (x_t in_rows[s:s+r]^T) out_rows[s:s+r]; work is sum of ranks, never max rank
    (except the dense group of short segments, bounded by DENSE_MAX_ELEMENTS)."""
    width = x.shape[1] + out.shape[1]
    num_rows = plan.derive("torch_sgmv_rows", num_adapter_rows)
    is_dense = x.dtype in DENSE_DTYPES and 0 < plan.num_tokens * num_rows * width <= DENSE_MAX_ELEMENTS
    gathered_ranks = tuple(g.rank for g in plan.rank_groups if 0 < g.rank * width <= GATHER_MAX_ELEMENTS)
    lay = plan.derive(f"torch_sgmv/{is_dense}/{gathered_ranks}",
                      lambda p: sgmv_torch_layout(p, is_dense, gathered_ranks))
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def write(tokens: torch.Tensor | slice, delta: torch.Tensor) -> None:
        if isinstance(tokens, slice):
            out[tokens].add_(delta) if accumulate else out[tokens].copy_(delta)
        elif accumulate:
            out.index_add_(0, tokens, delta.to(out.dtype))
        else:
            out.index_copy_(0, tokens, delta.to(out.dtype))

    if not accumulate:
        if lay.dense is not None:
            out.zero_()   # the dense group adds into every row
        elif lay.base_tokens.numel():
            out.index_fill_(0, lay.base_tokens, 0.0)
    if lay.dense is not None:
        rows = lay.dense.rows
        shrink = x @ in_rows.index_select(0, rows).T                          # [T, R]
        shrink = (shrink.to(acc_dtype) * lay.dense.mask).to(x.dtype)
        out.addmm_(shrink, out_rows.index_select(0, rows))
    d_in, d_out = x.shape[1], out.shape[1]
    for group in lay.gathered:
        r = group.rank
        step = max(1, CHUNK_ELEMENTS // (r * max(d_in, d_out)))
        for lo in range(0, group.tokens.numel(), step):
            rows = group.rows[lo * r:(lo + step) * r]
            n = rows.numel() // r
            tokens = slice(lo, lo + n) if group.is_every_token else group.tokens[lo:lo + n]
            x_rows = x[tokens] if group.is_every_token else x.index_select(0, tokens)   # type: ignore[index]
            # index_select copies whole rows (advanced indexing walks every element: ~1.5x slower here)
            # x as row vectors against each token's A^T ([n, 1, d_in] @ [n, d_in, r]): BLAS runs these as dot
            # products over contiguous rows, 2x faster on one core than [n, r, d_in] @ [n, d_in, 1] matvecs
            # (32 tokens, r 8, d_in 768, cold caches: 0.21 vs 0.44 ms with the gather)
            a_t = in_rows.index_select(0, rows).view(n, r, d_in).transpose(1, 2)
            if group.scale is not None and x.dtype == acc_dtype:   # the scale inside the GEMM: one op less
                shrink = torch.baddbmm(x_rows.new_empty(()), x_rows[:, None, :], a_t, beta=0.0, alpha=group.scale)
            else:
                shrink = torch.bmm(x_rows[:, None, :], a_t)
                shrink = (shrink.to(acc_dtype) * group.scales[lo:lo + n]).to(x.dtype)      # [n, 1, r]
            # expand: a weighted sum of each token's out_rows, read in place (no gathered copy, one op)
            offsets = group.offsets[:n] if lo == 0 else group.offsets[lo:lo + n] - lo * r
            write(tokens, F.embedding_bag(rows, out_rows, offsets, mode="sum", per_sample_weights=shrink.flatten()))
    for seg, tokens in lay.looped:
        rows = slice(seg.start, seg.start + seg.rank)
        if isinstance(tokens, slice) and accumulate and x.dtype == acc_dtype:
            # consecutive tokens: views, the scale inside the expand GEMM, added in place (1.8x faster than the
            # gather + scatter form at 32 tokens, r 8, 768 x 768 on one core)
            out[tokens].addmm_(x[tokens] @ in_rows[rows].T, out_rows[rows], alpha=seg.scale)
            continue
        x_seg = x[tokens] if isinstance(tokens, slice) else x.index_select(0, tokens)
        shrink = (x_seg @ in_rows[rows].T).to(acc_dtype) * seg.scale   # [n, r]
        write(tokens, shrink.to(x.dtype) @ out_rows[rows])
    return out
