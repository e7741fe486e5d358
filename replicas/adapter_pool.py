"""Device row pools of every target module, a row allocator over them, and the per-slot table for plans.

One pool pair per (layer, module): in_rows [P, d_in], out_rows [P, d_out], shared by LoRA and FLoRA/IA3
adapters (the rows have the same shape for both; the kind lives in the slot table, so one row budget
serves every adapter: S-LoRA's unified paging). Slot s owns rows start[s] .. start[s] + R_s - 1 in every
pool, R_s = the adapter's largest rank; a module it targets with rank r uses the first r of them, a module
it does not target has rank 0 there (base weight only).
"""

from __future__ import annotations

from bisect import insort
from dataclasses import dataclass

import torch

from lorafleet.infra.adapters import AdapterWeights
from lorafleet.infra.base_spec import TARGET_MODULES

MODULE_NAMES = tuple(TARGET_MODULES)


def module_index(layer: int, name: str) -> int:
    """Flat index of (layer, module name) into the pool list: layer-major, TARGET_MODULES order."""
    return layer * len(MODULE_NAMES) + MODULE_NAMES.index(name)


class RowAllocator:
    """First-fit allocation of contiguous row ranges, with coalescing on free."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self._free: list[tuple[int, int]] = [(0, num_rows)]   # (start, length), sorted by start

    @property
    def num_free_rows(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)

    def allocate(self, num_rows: int) -> int | None:
        for i, (start, length) in enumerate(self._free):
            if length >= num_rows:
                self._free[i:i + 1] = [(start + num_rows, length - num_rows)] if length > num_rows else []
                return start
        return None

    def free(self, start: int, num_rows: int) -> None:
        insort(self._free, (start, num_rows))
        merged: list[tuple[int, int]] = []
        for s, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                assert not merged or merged[-1][0] + merged[-1][1] < s, "rows freed twice"
                merged.append((s, n))
        self._free = merged

    def reset(self, used_rows: int) -> None:
        """After compaction: rows [0, used_rows) taken, the rest one free range."""
        self._free = [(used_rows, self.num_rows - used_rows)] if used_rows < self.num_rows else []


@dataclass(slots=True)
class SlotTable:
    """Host tensors the step's adapter plans are built from; index num_slots means 'no adapter'.

    start [S+1] int64; is_flora [S+1] bool; rank [M, S+1] int64 and scale [M, S+1] float32 per module.
    """

    start: torch.Tensor
    num_rows: torch.Tensor
    is_flora: torch.Tensor
    rank: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def empty(cls, num_modules: int, num_slots: int) -> SlotTable:
        return cls(torch.zeros(num_slots + 1, dtype=torch.int64), torch.zeros(num_slots + 1, dtype=torch.int64),
                   torch.zeros(num_slots + 1, dtype=torch.bool),
                   torch.zeros(num_modules, num_slots + 1, dtype=torch.int64),
                   torch.zeros(num_modules, num_slots + 1, dtype=torch.float32))


class AdapterPools:
    """Row pools + slots. Only the engine thread mutates them, between forward passes."""

    def __init__(self, num_layers: int, module_shapes: dict[str, tuple[int, int]], num_rows: int, num_slots: int,
                 dtype: torch.dtype, device: torch.device | str,
                 target_modules: tuple[str, ...] = MODULE_NAMES) -> None:
        self.num_rows = num_rows
        self.target_modules = tuple(target_modules)
        self.num_slots = num_slots
        self.num_modules = num_layers * len(MODULE_NAMES)
        self.in_rows: list[torch.Tensor] = []     # [P, d_in] per module index
        self.out_rows: list[torch.Tensor] = []    # [P, d_out]
        for _ in range(num_layers):
            for name in MODULE_NAMES:
                d_out, d_in = module_shapes[name]
                rows = num_rows if name in self.target_modules else 0   # no memory for modules never adapted
                self.in_rows.append(torch.zeros(rows, d_in, dtype=dtype, device=device))
                self.out_rows.append(torch.zeros(rows, d_out, dtype=dtype, device=device))
        self.table = SlotTable.empty(self.num_modules, num_slots)
        self.allocator = RowAllocator(num_rows)
        self._free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.in_rows, *self.out_rows))

    def can_install(self, num_rows: int) -> bool:
        return bool(self._free_slots) and self.allocator.largest_free >= num_rows

    def can_install_after_compaction(self, num_rows: int) -> bool:
        return bool(self._free_slots) and self.allocator.num_free_rows >= num_rows

    def install(self, weights: AdapterWeights) -> int:
        """Copy the adapter's rows into free rows of every pool it targets; returns its slot."""
        num_rows = weights.max_rank
        assert self.can_install(num_rows), "install() without can_install()"
        start = self.allocator.allocate(num_rows)
        assert start is not None
        slot = self._free_slots.pop()
        table = self.table
        table.start[slot], table.num_rows[slot] = start, num_rows
        table.is_flora[slot] = weights.peft_type != "LORA"
        table.rank[:, slot] = 0
        table.scale[:, slot] = 0.0
        for (layer, name), module in weights.modules.items():
            m = module_index(layer, name)
            self.in_rows[m][start:start + module.rank].copy_(module.in_rows, non_blocking=True)
            self.out_rows[m][start:start + module.rank].copy_(module.out_rows, non_blocking=True)
            table.rank[m, slot] = module.rank
            table.scale[m, slot] = module.scale
        return slot

    def uninstall(self, slot: int) -> None:
        table = self.table
        self.allocator.free(int(table.start[slot]), int(table.num_rows[slot]))
        table.rank[:, slot] = 0
        table.num_rows[slot] = 0
        self._free_slots.append(slot)

    def compact(self) -> None:
        """Move every installed slot's rows down to close the gaps (between steps only: plans hold starts)."""
        table = self.table
        used = [s for s in range(self.num_slots) if int(table.num_rows[s]) > 0]
        used.sort(key=lambda s: int(table.start[s]))
        next_row = 0
        pools = [p for p in (*self.in_rows, *self.out_rows) if p.shape[0]]
        for slot in used:
            start, num_rows = int(table.start[slot]), int(table.num_rows[slot])
            if start != next_row:   # moving down: source and destination may overlap, so copy via clone
                for pool in pools:
                    pool[next_row:next_row + num_rows] = pool[start:start + num_rows].clone()
                table.start[slot] = next_row
            next_row += num_rows
        self.allocator.reset(next_row)
