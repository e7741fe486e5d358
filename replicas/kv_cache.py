"""Paged KV cache bookkeeping: fixed-size blocks, a block table per sequence, the memory budget (no torch).

The tensors themselves live in the model runner ([num_layers, num_blocks * block_size, kv_heads, head_dim]);
token p of a sequence sits in slot block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.replicas.sequence import Sequence


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape of the cache: bytes per block = 2 (K and V) x layers x block_size x kv_heads x head_dim x dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype_bytes: int

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def num_blocks_for(self, budget_bytes: int) -> int:
        """Blocks that fit in `budget_bytes`; at least one is required."""
        num_blocks = budget_bytes // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV budget of {budget_bytes} bytes is below one block ({self.bytes_per_block} bytes)")
        return num_blocks


class BlockManager:
    """Free list of KV blocks; allocation grows a sequence's block table to cover its computed tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Lowest ids first: a fresh engine fills the cache from the front (easier to read in tests).
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks for the KV of tokens [num_computed, num_computed + num_new_tokens)."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.num_blocks_needed(seq, num_new_tokens)
        assert needed <= len(self._free), "allocate() without can_allocate()"
        for _ in range(needed):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` (finish, abort, or preemption by recompute)."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        assert len(self._free) <= self.num_blocks, "a block was freed twice"
