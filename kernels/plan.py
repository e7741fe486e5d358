"""Adapter-batch plan: tokens grouped by adapter slot once per engine step, shared by every layer call; resolve_plan."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .validation import KernelArgumentError

# FLoRA segments with at least this many (token x rank) rows fold B A into W once per tile
# (cost ~ tokens + rank passes) instead of expanding every token into `rank` rows (cost tokens x rank).
FLORA_MERGE_MIN_ROWS = 64

IndexLike = torch.Tensor | Sequence[int]
ScaleLike = torch.Tensor | Sequence[float]


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens order[lo:hi] all use pool rows start .. start+rank-1 with the same scale."""

    lo: int
    hi: int
    start: int
    rank: int
    scale: float

    @property
    def num_tokens(self) -> int:
        return self.hi - self.lo

    @property
    def is_flora_merged(self) -> bool:
        """FLoRA runs this segment as x (W o B A)^T rather than r expanded rows per token."""
        return self.rank >= 2 and self.num_tokens >= 2 and self.num_tokens * self.rank >= FLORA_MERGE_MIN_ROWS


@dataclass(frozen=True, slots=True)
class RankGroup:
    """Segments seg_lo:seg_hi (tokens order[tok_lo:tok_hi]) all have this rank."""

    rank: int
    seg_lo: int
    seg_hi: int
    tok_lo: int
    tok_hi: int


@dataclass(frozen=True, slots=True, eq=False)  # identity equality: fields are tensors
class AdapterBatchPlan:
    """Tokens of one batch sorted by (rank, start, scale) into segments; host ints beside device tensors.

    Device tensors (all on `device`): token_start/token_rank [T] int32, token_scale [T] float32 (per token,
    original order; rank-0 tokens normalised to start 0, scale 0); order [T] int64 (sorted position -> token);
    seg_offsets [S+1] int32; seg_start/seg_rank [S] int32; seg_scale [S] float32.
    Host copies (segments, rank_groups, max_rank, num_pool_rows_used) let launchers size grids and check
    pool bounds without a device sync. Backends cache their own launch metadata in `derived`.
    """

    token_start: torch.Tensor
    token_rank: torch.Tensor
    token_scale: torch.Tensor
    order: torch.Tensor
    seg_offsets: torch.Tensor
    seg_start: torch.Tensor
    seg_rank: torch.Tensor
    seg_scale: torch.Tensor
    segments: tuple[Segment, ...]
    rank_groups: tuple[RankGroup, ...]
    max_rank: int
    num_pool_rows_used: int
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        num_tokens, num_segments = self.order.numel(), len(self.segments)
        for name in ("token_start", "token_rank", "token_scale"):
            assert getattr(self, name).shape == (num_tokens,), f"{name} must have shape [T]"
        assert self.seg_offsets.shape == (num_segments + 1,)
        assert all(s.hi > s.lo for s in self.segments), "segments are never empty"
        assert sum(s.num_tokens for s in self.segments) == num_tokens
        assert all(a.rank < b.rank for a, b in zip(self.rank_groups, self.rank_groups[1:], strict=False))

    @property
    def num_tokens(self) -> int:
        return self.order.numel()

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def device(self) -> torch.device:
        return self.order.device

    @property
    def num_base_tokens(self) -> int:
        """Tokens without an adapter (rank 0); they sort first."""
        first = self.rank_groups[0] if self.rank_groups else None
        return first.tok_hi - first.tok_lo if first is not None and first.rank == 0 else 0

    def derive(self, key: str, build: Callable[[AdapterBatchPlan], Any]) -> Any:
        """Backend launch metadata, built on the first layer call of a step and reused by the rest."""
        if key not in self.derived:
            self.derived[key] = build(self)
        return self.derived[key]

    def to(self, device: torch.device | str) -> AdapterBatchPlan:
        device = torch.device(device)
        moved = {
            name: getattr(self, name).to(device, non_blocking=True)
            for name in ("token_start", "token_rank", "token_scale", "order", "seg_offsets", "seg_start",
                         "seg_rank", "seg_scale")
        }
        return AdapterBatchPlan(**moved, segments=self.segments, rank_groups=self.rank_groups,
                                max_rank=self.max_rank, num_pool_rows_used=self.num_pool_rows_used)


def _as_host(name: str, value: IndexLike | ScaleLike, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu")
    else:
        values = list(value)
        tensor = torch.tensor(values) if values else torch.empty(0, dtype=dtype)
    if tensor.dim() != 1:
        raise KernelArgumentError(f"{name} must be 1-D [T], got shape {tuple(tensor.shape)}")
    if dtype != torch.float32 and (tensor.is_floating_point() or tensor.is_complex()):
        raise KernelArgumentError(f"{name} must be an integer tensor, got {tensor.dtype}")
    return tensor.to(dtype)


def plan_adapter_batch(
    token_start: IndexLike,
    token_rank: IndexLike,
    token_scale: ScaleLike | None = None,
    *,
    device: torch.device | str | None = None,
) -> AdapterBatchPlan:
    """Group tokens into slot segments: sort by (rank, start, scale), cut where any key changes.

    token_start, token_rank: [T] ints (tensor on any device, or list); token_scale: [T] floats or None (= 1).
    Runs on the host (one copy to CPU if the inputs live on a GPU) and returns device tensors on `device`
    (default: the device of token_start, CPU for lists). Raises KernelArgumentError on negative starts or ranks.
    """
    start = _as_host("token_start", token_start, torch.int64)
    rank = _as_host("token_rank", token_rank, torch.int64)
    num_tokens = start.numel()
    scale = (torch.ones(num_tokens) if token_scale is None
             else _as_host("token_scale", token_scale, torch.float32))
    if rank.numel() != num_tokens or scale.numel() != num_tokens:
        raise KernelArgumentError(f"token_start, token_rank, token_scale must all have length T={num_tokens}, "
                         f"got {num_tokens}, {rank.numel()}, {scale.numel()}")
    if num_tokens and int(rank.min()) < 0:
        raise KernelArgumentError("token_rank must be >= 0 (0 = no adapter)")
    if num_tokens and int(start.min()) < 0:
        raise KernelArgumentError("token_start must be >= 0")
    if not bool(torch.isfinite(scale).all()):
        raise KernelArgumentError("token_scale must be finite")
    is_base = rank == 0
    start = torch.where(is_base, 0, start)  # rank-0 tokens share one segment whatever they were given
    scale = torch.where(is_base, 0.0, scale)

    # Lexicographic (rank, start, scale) order from stable sorts, least significant key first.
    order = torch.argsort(scale, stable=True)
    order = order[torch.argsort(start[order], stable=True)]
    order = order[torch.argsort(rank[order], stable=True)]
    s_start, s_rank, s_scale = start[order], rank[order], scale[order]
    cut = torch.ones(num_tokens, dtype=torch.bool)
    if num_tokens > 1:
        cut[1:] = (s_start[1:] != s_start[:-1]) | (s_rank[1:] != s_rank[:-1]) | (s_scale[1:] != s_scale[:-1])
    seg_lo = torch.nonzero(cut).flatten()
    seg_offsets = torch.cat([seg_lo, torch.tensor([num_tokens])])

    offsets = seg_offsets.tolist()
    seg_start, seg_rank, seg_scale = s_start[seg_lo], s_rank[seg_lo], s_scale[seg_lo]
    segments = tuple(
        Segment(lo, hi, st, rk, sc)
        for lo, hi, st, rk, sc in zip(offsets[:-1], offsets[1:], seg_start.tolist(), seg_rank.tolist(),
                                      seg_scale.tolist(), strict=True)
    )
    groups: list[RankGroup] = []
    for index, seg in enumerate(segments):
        if groups and groups[-1].rank == seg.rank:
            last = groups[-1]
            groups[-1] = RankGroup(seg.rank, last.seg_lo, index + 1, last.tok_lo, seg.hi)
        else:
            groups.append(RankGroup(seg.rank, index, index + 1, seg.lo, seg.hi))

    if device is None:
        device = token_start.device if isinstance(token_start, torch.Tensor) else torch.device("cpu")
    plan = AdapterBatchPlan(
        token_start=start.to(torch.int32), token_rank=rank.to(torch.int32), token_scale=scale,
        order=order, seg_offsets=seg_offsets.to(torch.int32), seg_start=seg_start.to(torch.int32),
        seg_rank=seg_rank.to(torch.int32), seg_scale=seg_scale,
        segments=segments, rank_groups=tuple(groups),
        max_rank=int(rank.max()) if num_tokens else 0,
        num_pool_rows_used=int((start + rank).max()) if num_tokens else 0,
    )
    return plan if torch.device(device).type == "cpu" else plan.to(device)


def resolve_plan(
    x: torch.Tensor,
    pool_rows: int,
    token_start: IndexLike | None,
    token_rank: IndexLike | None,
    token_scale: ScaleLike | None,
    plan: AdapterBatchPlan | None,
) -> AdapterBatchPlan:
    """Take the caller's plan, or build one from the per-token arrays (a host sync: tests, one-off calls)."""
    given = [name for name, value in (("token_start", token_start), ("token_rank", token_rank),
                                      ("token_scale", token_scale)) if value is not None]
    if plan is None:
        if token_start is None or token_rank is None:
            raise KernelArgumentError("pass token_start and token_rank, or plan=")
        plan = plan_adapter_batch(token_start, token_rank, token_scale, device=x.device)
    elif given:
        raise KernelArgumentError(f"pass either plan= or per-token arrays, not both (got plan and {given})")
    if not isinstance(plan, AdapterBatchPlan):
        raise KernelArgumentError(f"plan must be an AdapterBatchPlan, got {type(plan).__name__}")
    if plan.num_tokens != x.shape[0]:
        raise KernelArgumentError(f"plan/token arrays cover {plan.num_tokens} tokens but x has T={x.shape[0]}")
    if plan.device != x.device:
        raise KernelArgumentError(f"plan is on {plan.device} but x is on {x.device}; use plan.to(device)")
    if plan.num_pool_rows_used > pool_rows:
        raise KernelArgumentError(
            f"token_start + token_rank reaches pool row {plan.num_pool_rows_used - 1} but the pools have "
            f"P={pool_rows} rows")
    return plan


def ragged_arange(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lengths [N] int64 -> (owner, offset), each [sum(lengths)]: item i repeated lengths[i], and 0..len-1."""
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    return owner, torch.arange(owner.numel()) - first[owner]


def segment_positions(segments: Sequence[Segment]) -> torch.Tensor:
    """Sorted positions (indices into plan.order) of every token of these segments, in segment order; CPU."""
    lo = torch.tensor([s.lo for s in segments], dtype=torch.int64)
    owner, offset = ragged_arange(torch.tensor([s.num_tokens for s in segments], dtype=torch.int64))
    return lo[owner] + offset
