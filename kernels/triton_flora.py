"""flora_linear in Triton: an expanded-row kernel per rank class and a merge-on-the-fly segment kernel."""

from dataclasses import dataclass

import torch
import triton.language as tl

from .plan import AdapterBatchPlan, segment_positions
from .triton_runtime import cdiv, dot_flags, jit, next_pow2, num_sms

# Expanded tiles hold BT tokens x R rows; above this rank a token alone would overflow a tile, and the
# merged kernel (rank looped in chunks of 16) costs the same for a single token.
MAX_EXPANDED_RANK = 128
BLOCK_N, BLOCK_K, RANK_CHUNK = 64, 32, 16


def _flora_expanded_kernel(
    x_ptr, w_ptr, in_ptr, out_ptr, y_ptr, tok_ptr, start_ptr, rank_ptr,
    tok_lo, num_tokens, d_in, d_out, stride_x, stride_w, stride_in, stride_out, stride_y,
    R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # FLoRA eq. 6 on a tile of BT tokens (any adapters) x R rows: A o ((B o X) W^T), summed over rank.
    # Rank-0 tokens use in/out factors of 1 on row 0, so base tokens share the same pass over W.
    ti = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = ti < num_tokens
    tok = tl.load(tok_ptr + tok_lo + ti, mask=t_ok, other=0).to(tl.int64)
    start = tl.load(start_ptr + tok, mask=t_ok, other=0).to(tl.int64)
    rank = tl.load(rank_ptr + tok, mask=t_ok, other=0)
    j = tl.arange(0, R)
    row = start[:, None] + j[None, :]                                  # [BT, R] pool rows
    row_ok = t_ok[:, None] & (j[None, :] < rank[:, None])
    is_base = (rank[:, None] == 0) & (j[None, :] == 0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < d_out
    acc = tl.zeros((BT * R, BN), dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < d_in
        xk = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        a_in = tl.load(in_ptr + row[:, :, None] * stride_in + k[None, None, :],
                       mask=row_ok[:, :, None] & k_ok[None, None, :], other=0.0)
        a_in = tl.where(is_base[:, :, None], 1.0, a_in.to(tl.float32))
        a = tl.reshape(xk.to(tl.float32)[:, None, :] * a_in, (BT * R, BK)).to(xk.dtype)   # B o X rows
        w_t = tl.load(w_ptr + n[None, :] * stride_w + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), w_t.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w_t, acc, input_precision=PRECISION)
    b = tl.load(out_ptr + row[:, :, None] * stride_out + n[None, None, :],
                mask=row_ok[:, :, None] & n_ok[None, None, :], other=0.0)
    b = tl.where(is_base[:, :, None], 1.0, b.to(tl.float32))
    y = tl.sum(tl.reshape(acc, (BT, R, BN)) * b, axis=1)              # [BT, BN]
    tl.store(y_ptr + tok[:, None] * stride_y + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & n_ok[None, :])


def _flora_merged_kernel(
    x_ptr, w_ptr, in_ptr, out_ptr, y_ptr, order_ptr, seg_ids_ptr, seg_off_ptr, seg_start_ptr, seg_rank_ptr,
    d_in, d_out, stride_x, stride_w, stride_in, stride_out, stride_y,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One segment (one adapter): y = x (W o B A)^T with each [BK, BN] tile of W o B A built in registers,
    # so the cost is (tokens + rank) per W tile instead of tokens x rank.
    seg = tl.load(seg_ids_ptr + tl.program_id(0))
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
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    n_ok = n < d_out
    jc = tl.arange(0, RC)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < d_in
        delta = tl.zeros((BK, BN), dtype=tl.float32)                  # (B A)^T tile
        for j0 in range(0, rank, RC):
            j = j0 + jc
            j_ok = j < rank
            a_t = tl.load(in_ptr + (start + j)[None, :] * stride_in + k[:, None],
                          mask=k_ok[:, None] & j_ok[None, :], other=0.0)          # [BK, RC]
            b = tl.load(out_ptr + (start + j)[:, None] * stride_out + n[None, :],
                        mask=j_ok[:, None] & n_ok[None, :], other=0.0)            # [RC, BN]
            if UPCAST:
                delta = tl.dot(a_t.to(tl.float32), b.to(tl.float32), delta, input_precision="ieee")
            else:
                delta = tl.dot(a_t, b, delta, input_precision=PRECISION)
        w_t = tl.load(w_ptr + n[None, :] * stride_w + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        xk = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_eff = (w_t.to(tl.float32) * delta).to(xk.dtype)
        if UPCAST:
            acc = tl.dot(xk.to(tl.float32), w_eff.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xk, w_eff, acc, input_precision=PRECISION)
    tl.store(y_ptr + tok[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True, slots=True)
class FloraTritonLayout:
    expanded_tokens: torch.Tensor             # [Te] int32 token ids, grouped by rank class
    classes: tuple[tuple[int, int, int], ...]  # (R = pow2 >= rank, lo, hi) ranges of expanded_tokens
    merged_segments: torch.Tensor             # [Sm] int32 segment ids for the merged kernel
    max_merged_tokens: int


def flora_triton_layout(plan: AdapterBatchPlan) -> FloraTritonLayout:
    is_merged = [s.is_flora_merged or s.rank > MAX_EXPANDED_RANK for s in plan.segments]
    expanded = [s for s, merged in zip(plan.segments, is_merged, strict=True) if not merged]
    classes: list[tuple[int, int, int]] = []
    for seg in expanded:  # sorted by rank, so each class is one contiguous range
        rank_class = next_pow2(max(seg.rank, 1))
        lo = classes[-1][2] if classes else 0
        if classes and classes[-1][0] == rank_class:
            classes[-1] = (rank_class, classes[-1][1], lo + seg.num_tokens)
        else:
            classes.append((rank_class, lo, lo + seg.num_tokens))
    merged_ids = [i for i, merged in enumerate(is_merged) if merged]
    return FloraTritonLayout(
        expanded_tokens=plan.order[segment_positions(expanded).to(plan.device)].to(torch.int32),
        classes=tuple(classes),
        merged_segments=torch.tensor(merged_ids, dtype=torch.int32).to(plan.device),
        max_merged_tokens=max((plan.segments[i].num_tokens for i in merged_ids), default=0),
    )


def flora_linear_triton(x: torch.Tensor, weight: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor,
                        plan: AdapterBatchPlan, out: torch.Tensor) -> torch.Tensor:
    """Launch one expanded kernel per rank class present, plus one merged kernel for long segments."""
    lay = plan.derive("triton_flora", flora_triton_layout)
    d_out, d_in = weight.shape
    flags = dot_flags(x.dtype)
    strides = (x.stride(0), weight.stride(0), in_rows.stride(0), out_rows.stride(0), out.stride(0))
    expanded = jit(_flora_expanded_kernel)
    for rank_class, lo, hi in lay.classes:
        rows_per_tile = max(64, rank_class)      # tl.dot wants >= 16 rows; 64 amortises each W tile
        tokens_per_tile = rows_per_tile // rank_class
        token_tiles = cdiv(hi - lo, tokens_per_tile)
        # Decode streams W once: narrower column tiles when wide ones would leave SMs idle.
        block_n = BLOCK_N if token_tiles * cdiv(d_out, BLOCK_N) >= 2 * num_sms(x.device) else BLOCK_N // 2
        grid = (token_tiles, cdiv(d_out, block_n))
        expanded[grid](x, weight, in_rows, out_rows, out, lay.expanded_tokens, plan.token_start,
                       plan.token_rank, lo, hi - lo, d_in, d_out, *strides,
                       R=rank_class, BT=tokens_per_tile, BN=block_n, BK=BLOCK_K,
                       num_warps=8 if rows_per_tile > 64 else 4, **flags)
    if lay.merged_segments.numel():
        block_m = min(64, max(16, next_pow2(lay.max_merged_tokens)))
        merged_grid = (lay.merged_segments.numel(), cdiv(lay.max_merged_tokens, block_m),
                       cdiv(d_out, BLOCK_N))
        jit(_flora_merged_kernel)[merged_grid](
            x, weight, in_rows, out_rows, out, plan.order, lay.merged_segments, plan.seg_offsets,
            plan.seg_start, plan.seg_rank, d_in, d_out, *strides,
            BM=block_m, BN=BLOCK_N, BK=BLOCK_K, RC=RANK_CHUNK, num_warps=4, **flags)
    return out
