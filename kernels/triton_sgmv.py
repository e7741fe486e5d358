"""lora_delta in Triton: SGMV shrink and expand fused in one kernel per rank class, grouped by segment."""

from dataclasses import dataclass

import torch
import triton.language as tl

from .plan import AdapterBatchPlan
from .triton_runtime import cdiv, dot_flags, jit, next_pow2, num_sms

BLOCK_N = 64
# tl.dot needs N >= 16, so ranks 1..16 share one class (padded lanes are masked loads, no HBM traffic).
MIN_RANK_CLASS = 16
PROGRAMS_PER_SM = 4
# Punica's split path (split-K shrink, then expand) for classes of this padded rank and up, when the fused kernel
# would split columns (and so redo the shrink per split). Measured on an H200 (RESULTS, sgmv-paths-20261204T165335Z):
# 1.5-2.0x faster than fused at rank 64 on both 4096 shapes, T = 1-256; at ranks 8-16 it won on 4096x11008
# (1.07-1.28x) but lost at several 4096x4096 points (two launches instead of one), so small ranks stay fused.
SPLIT_MIN_RANK_PAD = 64


def _sgmv_kernel(
    x_ptr, in_ptr, out_ptr, y_ptr, part_ptr, order_ptr, seg_off_ptr, seg_start_ptr, seg_rank_ptr, seg_scale_ptr,
    seg_lo, d_in, d_out, k_per_split, cols_per_split, num_splits, num_tokens,
    stride_x, stride_in, stride_out, stride_y,
    RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACCUMULATE: tl.constexpr,
    SHRINK: tl.constexpr, EXPAND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Punica SGMV on one segment tile, in one of three modes (constexpr, so each compiles to its own kernel):
    # - SHRINK and EXPAND (fused): h = scale * X A^T over all of d_in ([BM, RP] kept in registers), then
    #   Y (+)= h B over this program's slice of d_out (program_id(2) splits the columns; a split redoes the small
    #   shrink, which keeps programs in flight for decode batches of a few tokens at small ranks);
    # - SHRINK alone: program_id(2) takes a slice of d_in (split-K), its partial h goes to part[split, token];
    # - EXPAND alone: h = scale * the sum of the partials in a fixed order, then Y (+)= h B on one column block.
    seg = seg_lo + tl.program_id(0)
    lo = tl.load(seg_off_ptr + seg)
    hi = tl.load(seg_off_ptr + seg + 1)
    m0 = lo + tl.program_id(1) * BM
    if m0 >= hi:
        return
    start = tl.load(seg_start_ptr + seg).to(tl.int64)
    rank = tl.load(seg_rank_ptr + seg)
    mi = m0 + tl.arange(0, BM)
    m_ok = mi < hi
    tok = tl.load(order_ptr + mi, mask=m_ok, other=0).to(tl.int64)
    j = tl.arange(0, RP)
    j_ok = j < rank
    h = tl.zeros((BM, RP), dtype=tl.float32)
    if SHRINK:
        k_lo = 0 if EXPAND else tl.program_id(2) * k_per_split   # fused: program_id(2) splits columns instead
        k_hi = tl.where(rank > 0, tl.minimum(k_lo + k_per_split, d_in), 0)   # rank 0: no shrink, zeros out
        for k0 in range(k_lo, k_hi, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < k_hi
            xk = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
            a_t = tl.load(in_ptr + (start + j)[None, :] * stride_in + k[:, None],
                          mask=k_ok[:, None] & j_ok[None, :], other=0.0)           # [BK, RP]
            if UPCAST:
                h = tl.dot(xk.to(tl.float32), a_t.to(tl.float32), h, input_precision="ieee")
            else:
                h = tl.dot(xk, a_t, h, input_precision=PRECISION)
    else:
        for split in range(0, num_splits):
            h += tl.load(part_ptr + (split * num_tokens + tok)[:, None] * RP + j[None, :], mask=m_ok[:, None],
                         other=0.0)
    if EXPAND:
        h = (h * tl.load(seg_scale_ptr + seg)).to(out_ptr.dtype.element_ty)
        n_lo = tl.program_id(2) * cols_per_split
        n_hi = tl.minimum(n_lo + cols_per_split, d_out)
        for n0 in range(n_lo, n_hi, BN):
            n = n0 + tl.arange(0, BN)
            n_ok = n < n_hi
            b = tl.load(out_ptr + (start + j)[:, None] * stride_out + n[None, :],
                        mask=j_ok[:, None] & n_ok[None, :], other=0.0)              # [RP, BN]
            if UPCAST:
                delta = tl.dot(h.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                delta = tl.dot(h, b, input_precision=PRECISION)
            y_ptrs = y_ptr + tok[:, None] * stride_y + n[None, :]
            y_mask = m_ok[:, None] & n_ok[None, :]
            if ACCUMULATE:
                delta += tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, delta.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.store(part_ptr + (tl.program_id(2) * num_tokens + tok)[:, None] * RP + j[None, :], h, mask=m_ok[:, None])


@dataclass(frozen=True, slots=True)
class SgmvClass:
    """Segments seg_lo:seg_hi share one padded rank RP; is_base marks the rank-0 segment."""

    rank_pad: int
    seg_lo: int
    seg_hi: int
    max_tokens: int
    is_base: bool


def sgmv_classes(plan: AdapterBatchPlan) -> tuple[SgmvClass, ...]:
    classes: list[SgmvClass] = []
    for index, seg in enumerate(plan.segments):  # sorted by rank: classes are contiguous
        rank_pad = max(MIN_RANK_CLASS, next_pow2(max(seg.rank, 1)))
        last = classes[-1] if classes else None
        if last is not None and not last.is_base and seg.rank > 0 and last.rank_pad == rank_pad:
            classes[-1] = SgmvClass(rank_pad, last.seg_lo, index + 1, max(last.max_tokens, seg.num_tokens), False)
        else:
            classes.append(SgmvClass(rank_pad, index, index + 1, seg.num_tokens, seg.rank == 0))
    return tuple(classes)


def lora_delta_triton(x: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor, plan: AdapterBatchPlan,
                      out: torch.Tensor, accumulate: bool, split: bool | None = None) -> torch.Tensor:
    """Per rank class present (the rank-0 class only when overwriting): one fused shrink+expand launch when its
    tiles alone fill the GPU or its rank is small, else (decode at rank >= SPLIT_MIN_RANK_PAD) Punica's two
    launches, a split-K shrink and an expand, so no program redoes the shrink. split=True/False forces a path."""
    classes = plan.derive("triton_sgmv", sgmv_classes)
    d_in, d_out = in_rows.shape[1], out_rows.shape[1]
    flags = dot_flags(x.dtype)
    n_blocks = cdiv(d_out, BLOCK_N)
    wanted_programs = PROGRAMS_PER_SM * num_sms(x.device)
    for cls in classes:
        if cls.is_base and accumulate:
            continue
        block_m = min(64 if cls.rank_pad <= 64 else 32, max(16, next_pow2(cls.max_tokens)))
        m_tiles = cdiv(cls.max_tokens, block_m)
        # The shrink is a serial loop over d_in per program: long K steps when the tile is small (decode).
        block_k = 128 if cls.rank_pad * block_m <= 512 else 32
        num_segments = cls.seg_hi - cls.seg_lo
        wanted = cdiv(wanted_programs, num_segments * m_tiles)
        cols_per_split = cdiv(n_blocks, min(max(wanted, 1), n_blocks)) * BLOCK_N
        col_splits = cdiv(d_out, cols_per_split)
        kernel, common = jit(_sgmv_kernel), (plan.order, plan.seg_offsets, plan.seg_start, plan.seg_rank,
                                             plan.seg_scale, cls.seg_lo, d_in, d_out)
        strides = (x.stride(0), in_rows.stride(0), out_rows.stride(0), out.stride(0))
        consts = dict(RP=cls.rank_pad, BM=block_m, BN=BLOCK_N, BK=block_k, ACCUMULATE=accumulate,
                      num_warps=8 if cls.rank_pad >= 64 else 4, **flags)
        use_split = col_splits > 1 and cls.rank_pad >= SPLIT_MIN_RANK_PAD if split is None else split
        if cls.is_base or not use_split:
            kernel[(num_segments, m_tiles, col_splits)](x, in_rows, out_rows, out, out, *common, d_in,
                                                        cols_per_split, 0, 0, *strides, SHRINK=True, EXPAND=True,
                                                        **consts)
            continue
        k_blocks = cdiv(d_in, block_k)
        k_per_split = cdiv(k_blocks, min(max(wanted, 1), k_blocks)) * block_k
        k_splits = cdiv(d_in, k_per_split)
        tokens = x.shape[0]
        partials = torch.empty(k_splits, tokens, cls.rank_pad, dtype=torch.float32, device=x.device)
        kernel[(num_segments, m_tiles, k_splits)](x, in_rows, out_rows, out, partials, *common, k_per_split,
                                                  BLOCK_N, k_splits, tokens, *strides, SHRINK=True, EXPAND=False,
                                                  **consts)
        kernel[(num_segments, m_tiles, n_blocks)](x, in_rows, out_rows, out, partials, *common, k_per_split,
                                                  BLOCK_N, k_splits, tokens, *strides, SHRINK=False, EXPAND=True,
                                                  **consts)
    return out
