"""ModelRunner: owns the model, KV cache tensors and adapter pools; turns a scheduled batch into logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.replicas.adapter_batch import AdapterBatch, build_adapter_batch
from lorafleet.replicas.adapter_pool import AdapterPools
from lorafleet.replicas.attention import AttentionMetadata, PagedKVCache, PrefillSpan
from lorafleet.replicas.model import LlamaModel
from lorafleet.replicas.scheduler import ScheduledSeq


@dataclass(frozen=True, slots=True)
class BatchInputs:
    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64
    attn: AttentionMetadata
    adapters: AdapterBatch | None
    logits_index: torch.Tensor   # [B] int64: the last token of each sampling sequence
    sampling: list[ScheduledSeq]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, pools: AdapterPools) -> None:
        self.model = model
        self.kv = kv
        self.pools = pools
        self.device = model.device
        self.block_size = kv.block_size
        # CPU: adjacent fresh prompts of one length share one SDPA call (the GPU keeps one call per prompt).
        self.is_batched_prefill = self.device.type == "cpu"

    def prepare(self, batch: list[ScheduledSeq], all_logits: bool = False) -> BatchInputs:
        """Flatten the batch (decodes first), map tokens to cache slots, build the step's adapter plans.
        all_logits: project every token (scoring), not only each sampling sequence's last one."""
        batch = sorted(batch, key=lambda s: s.num_new_tokens != 1)   # stable: decodes first, then prefills
        input_ids: list[int] = []
        positions: list[int] = []
        token_slot: list[int] = []
        no_adapter = self.pools.num_slots
        decode_tables, decode_lens = [], []
        prefills: list[tuple[int, int, int, list[int]]] = []
        logits_index: list[int] = []
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            lo = len(input_ids)
            input_ids += seq.token_ids(start, start + n)
            positions += range(start, start + n)
            token_slot += [no_adapter if seq.adapter_slot is None else seq.adapter_slot] * n
            if n == 1:
                decode_tables.append(seq.block_table)
                decode_lens.append(start + 1)
            else:
                prefills.append((lo, lo + n, start, seq.block_table))
            if all_logits:
                logits_index += range(lo, lo + n)
            elif item.samples:
                logits_index.append(lo + n - 1)
        pos = torch.tensor(positions, dtype=torch.int64)
        tables = [item.seq.block_table for item in batch]
        owner = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor([i.num_new_tokens for i in batch]))
        slot_mapping = self._slots(tables, owner, pos)
        attn = AttentionMetadata(
            slot_mapping=slot_mapping.to(self.device),
            num_decodes=len(decode_tables),
            decode_gather=None, decode_mask=None,
            prefills=self._prefill_spans(prefills),
        )
        if decode_tables:
            max_len = max(decode_lens)
            key_pos = torch.arange(max_len).expand(len(decode_tables), max_len)
            lens = torch.tensor(decode_lens).unsqueeze(1)
            mask = key_pos < lens
            gather = self._slots(decode_tables, torch.arange(len(decode_tables)).unsqueeze(1), key_pos)
            attn = AttentionMetadata(attn.slot_mapping, attn.num_decodes, (gather * mask).to(self.device),
                                     mask[:, None, None, :].to(self.device), attn.prefills)
        adapters = build_adapter_batch(torch.tensor(token_slot, dtype=torch.int64), self.pools.table, self.device)
        return BatchInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64).to(self.device),
            positions=pos.to(self.device), attn=attn, adapters=adapters,
            logits_index=torch.tensor(logits_index, dtype=torch.int64).to(self.device),
            sampling=[item for item in batch if item.samples],
        )

    @torch.inference_mode()
    def run(self, inputs: BatchInputs) -> torch.Tensor:
        """Logits [B, V] float32 for the sampling sequences of the batch (B may be 0: prefill chunks only)."""
        return self.model.forward(inputs.input_ids, inputs.positions, inputs.attn, self.kv, inputs.adapters,
                                  inputs.logits_index)

    def _slots(self, tables: list[list[int]], owner: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Cache slot of token position pos of sequence owner: table[pos // bs] * bs + pos % bs (host int64)."""
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
        block = torch.clamp(pos // self.block_size, max=width - 1)
        return padded[owner, block] * self.block_size + pos % self.block_size

    def _prefill_spans(self, prefills: list[tuple[int, int, int, list[int]]]) -> tuple[PrefillSpan, ...]:
        """One span per chunk, except that adjacent fresh prompts of one length share a span (one SDPA call)."""
        spans: list[PrefillSpan] = []
        for lo, hi, num_context, table in prefills:
            last = spans[-1] if spans else None
            if (self.is_batched_prefill and num_context == 0 and last is not None and last.gather is None
                    and last.hi == lo and (last.hi - last.lo) // last.num_seqs == hi - lo):
                spans[-1] = PrefillSpan(last.lo, hi, 0, None, None, last.num_seqs + 1)
            else:
                spans.append(self._prefill_span(lo, hi, num_context, table))
        return tuple(spans)

    def _prefill_span(self, lo: int, hi: int, num_context: int, table: list[int]) -> PrefillSpan:
        if num_context == 0:
            return PrefillSpan(lo, hi, 0, None, None)
        num_keys = num_context + hi - lo
        key_pos = torch.arange(num_keys)
        gather = self._slots([table], torch.zeros(num_keys, dtype=torch.int64), key_pos)
        query_pos = torch.arange(num_context, num_keys).unsqueeze(1)
        return PrefillSpan(lo, hi, num_context, gather.to(self.device), (key_pos <= query_pos).to(self.device))
