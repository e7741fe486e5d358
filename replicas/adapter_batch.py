"""The step's adapter context: one kernel plan per distinct (rank, scale) pattern, shared by the modules with it.

Every target module of every layer needs a plan for the LoRA tokens and one for the FLoRA/IA3 tokens.
Modules whose ranks and scales agree over the adapters in the batch (usually all targeted modules of
one kind) share a plan, so a step builds a handful of plans, never one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.kernels import AdapterBatchPlan, plan_adapter_batch
from lorafleet.replicas.adapter_pool import SlotTable


@dataclass(frozen=True, slots=True)
class AdapterBatch:
    """Per flat module index: the plan for LoRA tokens and for FLoRA tokens (None = no such work there)."""

    lora: list[AdapterBatchPlan | None]
    flora: list[AdapterBatchPlan | None]
    num_plans: int


def build_adapter_batch(token_slot: torch.Tensor, table: SlotTable, device: torch.device) -> AdapterBatch | None:
    """token_slot [T] int64 host: each token's adapter slot, or num_slots for the base model."""
    num_slots = table.start.numel() - 1
    active = torch.unique(token_slot)
    active = active[active != num_slots]
    if active.numel() == 0:
        return None
    num_modules = table.rank.shape[0]
    plans: dict[bool, list[AdapterBatchPlan | None]] = {}
    num_plans = 0
    for is_flora in (False, True):
        slots = active[table.is_flora[active] == is_flora]
        if slots.numel() == 0:
            plans[is_flora] = [None] * num_modules
            continue
        ranks = table.rank[:, slots]                                    # [M, A]
        # FLoRA ignores the scale; LoRA modules must agree on rank and scale to share a plan.
        key = ranks.double() if is_flora else torch.cat([ranks.double(), table.scale[:, slots].double()], dim=1)
        patterns, inverse = torch.unique(key, dim=0, return_inverse=True)
        group_plans: list[AdapterBatchPlan | None] = []
        for g in range(patterns.shape[0]):
            module = int(torch.nonzero(inverse == g)[0])
            if not bool(table.rank[module, slots].any()):
                group_plans.append(None)
                continue
            # Tokens of the other kind (and base tokens, whose slot row is all zeros) get rank 0.
            token_rank = table.rank[module][token_slot] * (table.is_flora[token_slot] == is_flora)
            token_scale = None if is_flora else table.scale[module][token_slot]
            group_plans.append(plan_adapter_batch(table.start[token_slot], token_rank, token_scale, device=device))
            num_plans += 1
        plans[is_flora] = [group_plans[i] for i in inverse.tolist()]
    return AdapterBatch(lora=plans[False], flora=plans[True], num_plans=num_plans)
