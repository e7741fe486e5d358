"""Synthetic adapter batches (row pools, weight, per-token arrays) for kernel tests and benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# How tokens pick adapters (punica's popularity patterns): one adapter each, all the same one, a few
# adapters uniformly, or half the tokens on one hot adapter and the rest spread out.
POPULARITY = ("distinct", "identical", "uniform", "skewed")


@dataclass(frozen=True, slots=True)
class SyntheticAdapters:
    """x [T, d_in], weight [d_out, d_in], pools [P, d_in] / [P, d_out], token arrays [T] (CPU int64/fp32)."""

    x: torch.Tensor
    weight: torch.Tensor
    in_rows: torch.Tensor
    out_rows: torch.Tensor
    token_start: torch.Tensor
    token_rank: torch.Tensor
    token_scale: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    def to(self, dtype: torch.dtype) -> SyntheticAdapters:
        cast = {name: getattr(self, name).to(dtype) for name in ("x", "weight", "in_rows", "out_rows")}
        return SyntheticAdapters(**cast, token_start=self.token_start, token_rank=self.token_rank,
                            token_scale=self.token_scale)


def assign_adapters(num_tokens: int, popularity: str, generator: torch.Generator) -> torch.Tensor:
    """[T] int64 adapter index per token, indices 0..A-1 all used, for one of POPULARITY."""
    if popularity == "distinct":
        return torch.arange(num_tokens)
    if popularity == "identical":
        return torch.zeros(num_tokens, dtype=torch.int64)
    if popularity == "uniform":
        picks = torch.randint(0, max(1, math.isqrt(num_tokens) + 1), (num_tokens,), generator=generator)
    elif popularity == "skewed":
        picks = torch.randint(1, max(2, num_tokens // 2 + 1), (num_tokens,), generator=generator)
        picks[torch.rand(num_tokens, generator=generator) < 0.5] = 0
    else:
        raise ValueError(f"popularity must be one of {POPULARITY}, got {popularity!r}")
    return torch.unique(picks, return_inverse=True)[1]  # renumber so every index is used


def make_adapter_batch(
    num_tokens: int,
    d_in: int,
    d_out: int,
    ranks: Sequence[int],
    *,
    popularity: str = "distinct",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    pool_gap: int = 1,
) -> SyntheticAdapters:
    """Random batch whose adapters take ranks from `ranks` in turn (rank 0 = base-only tokens).

    Adapters sit in the pool in shuffled order with `pool_gap` random rows between them, so a kernel that
    reads past a rank or assumes sorted starts produces wrong numbers. Values are scaled so outputs stay
    O(1) in float16. Indices are drawn on the CPU, values in float32 on `device`, then cast.
    """
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(1 << 30, ())))
    adapter = assign_adapters(num_tokens, popularity, gen)
    num_adapters = int(adapter.max()) + 1 if num_tokens else 0
    adapter_rank = torch.tensor([ranks[i % len(ranks)] for i in range(num_adapters)], dtype=torch.int64)
    placement = torch.randperm(num_adapters, generator=gen)        # pool order differs from token order
    sizes = adapter_rank[placement] + pool_gap
    pool_start = torch.empty(num_adapters, dtype=torch.int64)
    pool_start[placement] = torch.cumsum(sizes, 0) - sizes
    num_rows = int(sizes.sum()) if num_adapters else 0
    max_rank = max(1, int(adapter_rank.max()) if num_adapters else 1)

    scale = 0.5 + torch.rand(num_adapters, generator=gen)
    token_rank = adapter_rank[adapter]

    device = torch.device(device)
    values = torch.Generator(device=device).manual_seed(int(torch.randint(1 << 30, (), generator=gen)))

    def randn(rows: int, cols: int, std: float) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=values, device=device) * std).to(dtype)

    return SyntheticAdapters(
        x=randn(num_tokens, d_in, 1.0),
        weight=randn(d_out, d_in, 1 / math.sqrt(d_in)),
        in_rows=randn(num_rows, d_in, 1.0),
        out_rows=randn(num_rows, d_out, 1 / math.sqrt(max_rank)),
        token_start=torch.where(token_rank > 0, pool_start[adapter], 0),
        token_rank=token_rank,
        token_scale=scale[adapter].to(torch.float32),
    )


def pad_to_rank(batch: SyntheticAdapters, rank: int) -> SyntheticAdapters:
    """The same batch as a max-rank-padded system stores it: every token's adapter in `rank` rows,
    rows past its real rank zero, so results are unchanged and only the work grows."""
    num_tokens = batch.num_tokens
    j = torch.arange(rank)
    real = j < batch.token_rank[:, None]                                        # [T, rank]
    src = (batch.token_start[:, None] + j).clamp(max=max(batch.in_rows.shape[0] - 1, 0))
    keep = real.to(batch.in_rows.device, batch.in_rows.dtype)[:, :, None]
    src = src.to(batch.in_rows.device)
    return SyntheticAdapters(
        x=batch.x, weight=batch.weight,
        in_rows=(batch.in_rows[src] * keep).reshape(num_tokens * rank, -1),
        out_rows=(batch.out_rows[src] * keep).reshape(num_tokens * rank, -1),
        token_start=torch.arange(num_tokens) * rank,
        token_rank=torch.full((num_tokens,), rank, dtype=torch.int64),
        token_scale=batch.token_scale,
    )
