"""Paged attention in plain torch: write the step's K/V into cache slots, then attend per group of queries.

Decodes (one query each) run as one padded SDPA call over K/V gathered through the block tables;
prefill chunks run one SDPA call each (causal; bottom-right causal when earlier chunks are cached), except that
adjacent fresh prompts of one length run as one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    """Query tokens [lo, hi) of one sequence; keys are its first num_context + (hi - lo) tokens.
    num_seqs > 1: tokens [lo, hi) are num_seqs fresh prompts of (hi - lo) / num_seqs tokens each, one after
    the other (num_context 0), attended as one batch."""

    lo: int
    hi: int
    num_context: int
    gather: torch.Tensor | None      # [L] int64 cache slots of all L keys; None when num_context == 0
    mask: torch.Tensor | None        # [hi - lo, L] bool, bottom-right causal; None when num_context == 0
    num_seqs: int = 1

    def __post_init__(self) -> None:
        assert self.num_seqs == 1 or (self.num_context == 0 and (self.hi - self.lo) % self.num_seqs == 0)


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each query attends to. Decodes come first."""

    slot_mapping: torch.Tensor       # [T] int64 cache slot of each new token's K/V
    num_decodes: int
    decode_gather: torch.Tensor | None   # [D, Lmax] int64 cache slots (padding points at slot 0)
    decode_mask: torch.Tensor | None     # [D, 1, 1, Lmax] bool, True = attend
    prefills: tuple[PrefillSpan, ...]


class PagedKVCache:
    """K and V of every layer: [num_layers, num_blocks * block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, hd], k/v [T, kvH, hd] of this step's tokens; k_cache/v_cache [slots, kvH, hd] (one layer,
    written in place at meta.slot_mapping). Returns [T, H, hd]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    num_decodes = meta.num_decodes
    # Only decodes, or one prefill call: its result is the output (no copy into a fresh tensor).
    is_single = q.shape[0] > 0 and (num_decodes == q.shape[0] or (num_decodes == 0 and len(meta.prefills) == 1))
    out = None if is_single else torch.empty_like(q)
    if num_decodes:
        keys = _gather(k_cache, meta.decode_gather).transpose(1, 2)  # [D, kvH, Lmax, hd]
        values = _gather(v_cache, meta.decode_gather).transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            q[:num_decodes].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True,
        ).squeeze(2)
        if out is None:
            return attended
        out[:num_decodes] = attended
    for span in meta.prefills:
        n = (span.hi - span.lo) // span.num_seqs
        query = q[span.lo:span.hi].unflatten(0, (span.num_seqs, n)).transpose(1, 2)   # [B, H, n, hd]
        if span.gather is None:     # fresh prompts: their own K/V, no cache read
            keys = k[span.lo:span.hi].unflatten(0, (span.num_seqs, n)).transpose(1, 2)
            values = v[span.lo:span.hi].unflatten(0, (span.num_seqs, n)).transpose(1, 2)
            attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                                      enable_gqa=True)
        else:
            keys = _gather(k_cache, span.gather[None]).transpose(1, 2)  # [1, kvH, L, hd]
            values = _gather(v_cache, span.gather[None]).transpose(1, 2)
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=span.mask, scale=scale,
                                                      enable_gqa=True)
        attended = attended.transpose(1, 2).flatten(0, 1)              # [hi - lo, H, hd]
        if out is None:
            return attended
        out[span.lo:span.hi] = attended
    return out


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [slots, kvH, hd], slots [B, L] -> [B, L, kvH, hd]: index_select on whole rows (faster than
    advanced indexing, which walks every element)."""
    rows = cache.flatten(1).index_select(0, slots.flatten())
    return rows.view(*slots.shape, *cache.shape[1:])
