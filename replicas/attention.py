"""Paged attention in plain torch: write the step's K/V into cache slots, then attend per group of queries.

Decodes (one query each) run as one padded SDPA call over K/V gathered through the block tables;
prefill chunks run one SDPA call each (causal; bottom-right causal when earlier chunks are cached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    """Query tokens [lo, hi) of one sequence; keys are its first num_context + (hi - lo) tokens."""

    lo: int
    hi: int
    num_context: int
    gather: torch.Tensor | None      # [L] int64 cache slots of all L keys; None when num_context == 0
    mask: torch.Tensor | None        # [hi - lo, L] bool, bottom-right causal; None when num_context == 0


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
    out = torch.empty_like(q)
    num_decodes = meta.num_decodes
    if num_decodes:
        keys = k_cache[meta.decode_gather].transpose(1, 2)          # [D, kvH, Lmax, hd]
        values = v_cache[meta.decode_gather].transpose(1, 2)
        out[:num_decodes] = F.scaled_dot_product_attention(
            q[:num_decodes].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True,
        ).squeeze(2)
    for span in meta.prefills:
        query = q[span.lo:span.hi].transpose(0, 1).unsqueeze(0)     # [1, H, n, hd]
        if span.gather is None:     # fresh prompt: its own K/V, no cache read
            keys = k[span.lo:span.hi].transpose(0, 1).unsqueeze(0)
            values = v[span.lo:span.hi].transpose(0, 1).unsqueeze(0)
            attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                                      enable_gqa=True)
        else:
            keys = k_cache[span.gather].transpose(0, 1).unsqueeze(0)  # [1, kvH, L, hd]
            values = v_cache[span.gather].transpose(0, 1).unsqueeze(0)
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=span.mask, scale=scale,
                                                      enable_gqa=True)
        out[span.lo:span.hi] = attended.squeeze(0).transpose(0, 1)
    return out
