"""flora_linear on plain torch (the CPU path): every expanded row of a batch in one GEMM with W."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import AdapterBatchPlan, Segment, ragged_arange, segment_positions

# Cap on expanded-row temporaries (rows x max(d_in, d_out) elements, 64 MiB in fp32): prefill of a
# rank-128 batch would otherwise materialise T x 128 rows at once.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True, slots=True)
class FloraTorchLayout:
    """Expanded rows of the small segments (token-major) and the merged segments, from one plan."""

    base_tokens: torch.Tensor            # [T0] int64, rank-0 tokens
    expanded_tokens: torch.Tensor        # [Te] int64, tokens on the expanded path
    row_token: torch.Tensor              # [E] int64, token of each expanded row, E = sum of their ranks
    row_pool: torch.Tensor               # [E] int64, pool row (start + j) of each expanded row
    row_local: torch.Tensor              # [E] int64, index into expanded_tokens
    token_row_offsets: tuple[int, ...]   # [Te + 1] host, first expanded row of each token
    merged: tuple[tuple[Segment, torch.Tensor], ...]  # (segment, its [n] int64 tokens)


def flora_torch_layout(plan: AdapterBatchPlan) -> FloraTorchLayout:
    device = plan.device
    base = [s for s in plan.segments if s.rank == 0]
    expanded = [s for s in plan.segments if s.rank > 0 and not s.is_flora_merged]
    merged = [s for s in plan.segments if s.is_flora_merged]

    seg_owner, _ = ragged_arange(torch.tensor([s.num_tokens for s in expanded], dtype=torch.int64))
    token_rank = torch.tensor([s.rank for s in expanded], dtype=torch.int64)[seg_owner]
    token_start = torch.tensor([s.start for s in expanded], dtype=torch.int64)[seg_owner]
    row_local, j = ragged_arange(token_rank)
    expanded_tokens = plan.order[segment_positions(expanded).to(device)]
    return FloraTorchLayout(
        base_tokens=plan.order[segment_positions(base).to(device)],
        expanded_tokens=expanded_tokens,
        row_token=expanded_tokens[row_local.to(device)],
        row_pool=(token_start[row_local] + j).to(device),
        row_local=row_local.to(device),
        token_row_offsets=tuple([0, *torch.cumsum(token_rank, 0).tolist()]),
        merged=tuple((s, plan.order[s.lo:s.hi]) for s in merged),
    )


def _token_chunks(offsets: tuple[int, ...], max_rows: int) -> list[tuple[int, int]]:
    """Split expanded tokens into runs of at most max_rows rows (a token is never split)."""
    chunks, lo = [], 0
    for hi in range(1, len(offsets)):
        if offsets[hi] - offsets[lo] > max_rows and hi - 1 > lo:
            chunks.append((lo, hi - 1))
            lo = hi - 1
    if len(offsets) > 1:
        chunks.append((lo, len(offsets) - 1))
    return chunks


def flora_linear_torch(x: torch.Tensor, weight: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor,
                       plan: AdapterBatchPlan, out: torch.Tensor) -> torch.Tensor:
    """FLoRA eq. 6 with rows instead of padding: Y = A o ((B o X) W^T), segment-summed over rank.

    Rank-0 tokens ride in the first GEMM (one pass over W for the batch, the fused-forward idea);
    long high-rank segments use x (W o B A)^T, whose cost does not grow with rank x tokens.
    """
    lay = plan.derive("torch_flora", flora_torch_layout)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    num_base = lay.base_tokens.numel()
    base_x = x.index_select(0, lay.base_tokens)
    max_rows = max(1, CHUNK_ELEMENTS // max(x.shape[1], out.shape[1]))
    offsets = lay.token_row_offsets
    for t_lo, t_hi in _token_chunks(offsets, max_rows):
        rows = slice(offsets[t_lo], offsets[t_hi])
        x_rows = x.index_select(0, lay.row_token[rows]) * in_rows.index_select(0, lay.row_pool[rows])
        if t_lo == 0 and num_base:
            x_rows = torch.cat([base_x, x_rows])
        y_rows = x_rows @ weight.T                                   # [T0 + E_chunk, d_out]
        if t_lo == 0 and num_base:
            out.index_copy_(0, lay.base_tokens, y_rows[:num_base])
            y_rows = y_rows[num_base:]
        y_rows = y_rows.to(acc_dtype) * out_rows.index_select(0, lay.row_pool[rows]).to(acc_dtype)
        acc = torch.zeros(t_hi - t_lo, out.shape[1], dtype=acc_dtype, device=x.device)
        acc.index_add_(0, lay.row_local[rows] - t_lo, y_rows)      # sum over j < rank per token
        out.index_copy_(0, lay.expanded_tokens[t_lo:t_hi], acc.to(out.dtype))
    if num_base and len(offsets) == 1:                               # no expanded rows to share W with
        out.index_copy_(0, lay.base_tokens, base_x @ weight.T)
    for seg, tokens in lay.merged:
        a = in_rows[seg.start:seg.start + seg.rank].to(acc_dtype)   # [r, d_in]
        b = out_rows[seg.start:seg.start + seg.rank].to(acc_dtype)  # [r, d_out]
        w_eff = (b.T @ a).mul_(weight)                              # W o (B A): [d_out, d_in]
        out.index_copy_(0, tokens, x.index_select(0, tokens) @ w_eff.to(x.dtype).T)
    return out
