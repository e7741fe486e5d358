"""KV block bookkeeping, the memory budget, and the paged attention that reads through block tables."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorafleet.replicas.attention import AttentionMetadata, PrefillSpan, paged_attention
from lorafleet.replicas.kv_cache import BlockManager, KVLayout
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.replicas.sequence import Sequence

REPLICAS = Path(__file__).resolve().parents[2] / "replicas"


def _seq(num_prompt: int) -> Sequence:
    return Sequence("r", list(range(num_prompt)), SamplingParams(), None, 0.0)


def test_allocate_grows_block_table_and_free_returns_blocks():
    blocks = BlockManager(num_blocks=5, block_size=4)
    seq = _seq(9)
    assert blocks.num_blocks_needed(seq, 9) == 3 and blocks.can_allocate(seq, 9)
    blocks.allocate(seq, 9)
    assert seq.block_table == [0, 1, 2] and blocks.num_free_blocks == 2
    seq.num_computed_tokens = 9
    assert blocks.num_blocks_needed(seq, 3) == 0       # tokens 10..12 fit in block 2
    assert blocks.num_blocks_needed(seq, 4) == 1
    assert not blocks.can_allocate(seq, 12)
    blocks.free(seq)
    assert seq.block_table == [] and blocks.num_free_blocks == 5


def test_budget_in_bytes():
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, block_size=16, dtype_bytes=4)
    assert layout.bytes_per_block == 2 * 4 * 16 * 2 * 32 * 4
    assert layout.num_blocks_for(10 * layout.bytes_per_block + 5) == 10
    with pytest.raises(ValueError, match="below one block"):
        layout.num_blocks_for(layout.bytes_per_block - 1)


def test_bookkeeping_modules_never_import_torch():
    """The scheduler side is pure Python (STYLE.md): checked on the source, not by importing."""
    for name in ("scheduler.py", "kv_cache.py", "sequence.py", "sampling_params.py", "config.py", "outputs.py"):
        tree = ast.parse((REPLICAS / name).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(m.split(".")[0] == "torch" for m in imported), name
        assert not any(m.startswith("lorafleet.") and m.split(".")[-1] in ("engine", "model", "attention", "sampler")
                       for m in imported), name


def _dense_attention(q, k, v, num_context):
    """Reference: queries at positions num_context.. attend causally to all keys (GQA by repeat)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    n, num_keys = q.shape[0], k.shape[0]
    mask = torch.arange(num_keys)[None, :] <= torch.arange(num_context, num_context + n)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def test_paged_attention_matches_dense_for_scattered_blocks():
    torch.manual_seed(0)
    heads, kv_heads, hd, bs = 4, 2, 8, 4
    k_cache, v_cache = torch.zeros(40, kv_heads, hd), torch.zeros(40, kv_heads, hd)
    table_a, table_b = [7, 2, 5], [1, 9]                  # scattered, out-of-order blocks
    # Sequence A: 10 cached tokens, decodes token 11. Sequence B: 3 cached, prefills a 4-token chunk.
    keys_a, vals_a = torch.randn(11, kv_heads, hd), torch.randn(11, kv_heads, hd)
    keys_b, vals_b = torch.randn(7, kv_heads, hd), torch.randn(7, kv_heads, hd)

    def slots(table, positions):
        return torch.tensor([table[p // bs] * bs + p % bs for p in positions])

    k_cache[slots(table_a, range(10))], v_cache[slots(table_a, range(10))] = keys_a[:10], vals_a[:10]
    k_cache[slots(table_b, range(3))], v_cache[slots(table_b, range(3))] = keys_b[:3], vals_b[:3]
    q = torch.randn(5, heads, hd)
    gather_a = slots(table_a, range(11))
    meta = AttentionMetadata(
        slot_mapping=torch.cat([slots(table_a, [10]), slots(table_b, range(3, 7))]),
        num_decodes=1,
        decode_gather=torch.cat([gather_a, torch.zeros(1, dtype=torch.long)])[None],   # padded to 12 keys
        decode_mask=torch.tensor([[True] * 11 + [False]])[:, None, None, :],
        prefills=(PrefillSpan(1, 5, 3, slots(table_b, range(7)),
                              torch.arange(7)[None, :] <= torch.arange(3, 7)[:, None]),),
    )
    new_k, new_v = torch.cat([keys_a[10:], keys_b[3:]]), torch.cat([vals_a[10:], vals_b[3:]])
    out = paged_attention(q, new_k, new_v, k_cache, v_cache, meta, scale=hd ** -0.5)
    torch.testing.assert_close(out[:1], _dense_attention(q[:1], keys_a, vals_a, 10))
    torch.testing.assert_close(out[1:], _dense_attention(q[1:], keys_b, vals_b, 3))
    torch.testing.assert_close(k_cache[slots(table_b, range(7))], keys_b)
