"""The solver's adapters and pieces as arrays (Items, Pool), and the two cuts of step 3 on a class's pool."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafleet.placement.bins import EPS, AdapterLoad

Piece = tuple[AdapterLoad, float, int]  # (adapter, tokens/s of this piece, its rank class): the one-at-a-time form


@dataclass(frozen=True, slots=True)
class Items:
    """The solver's input as arrays, indexed by position k in `adapters`; `items[adapter_id]` is its bytes (the
    size mapping of the one-at-a-time paths, for the adapters that tuples() handed to them)."""

    adapters: Sequence[AdapterLoad]
    demand: np.ndarray  # [N] float64 tokens/s
    nbytes: np.ndarray  # [N] int64 adapter bytes
    # adapter_id -> k of the adapters tuples() made pieces of: a dict of every adapter costs ~0.3 s at 1M
    position: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, adapter_id: str) -> int:
        return int(self.nbytes[self.position[adapter_id]])

    def tuples(self, pool: Pool) -> list[Piece]:
        """The pieces in the one-at-a-time form (few: the hot adapters, leftovers, retries)."""
        adapters, position = self.adapters, self.position
        out = [(adapters[k], x, c)
               for k, x, c in zip(pool.adapter.tolist(), pool.amount.tolist(), pool.cls.tolist(), strict=True)]
        position.update(zip([item.adapter_id for item, _, _ in out], pool.adapter.tolist(), strict=True))
        return out


@dataclass(frozen=True, slots=True)
class Pool:
    """Pieces as arrays: piece i is amount[i] tokens/s of adapter position adapter[i], of rank class cls[i]."""

    adapter: np.ndarray  # [P] int64
    amount: np.ndarray  # [P] float64
    cls: np.ndarray  # [P] int64

    @classmethod
    def empty(cls) -> Pool:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.adapter)

    def take(self, index: np.ndarray) -> Pool:
        return Pool(self.adapter[index], self.amount[index], self.cls[index])

    def __add__(self, other: Pool) -> Pool:
        return Pool(np.r_[self.adapter, other.adapter], np.r_[self.amount, other.amount], np.r_[self.cls, other.cls])

    def total(self) -> float:
        """Σ amount, added left to right (the float a loop over the pieces gives)."""
        return float(np.cumsum(self.amount)[-1]) if len(self) else 0.0

    def hottest_first(self) -> Pool:
        return self.take(np.argsort(-self.amount, kind="stable"))


def shed_memory(pool: Pool, max_total_bytes: float, nbytes: np.ndarray) -> tuple[Pool, Pool]:
    """(kept, shed): the pool hottest first, its coldest whole pieces moved off (coldest first) until its adapters'
    bytes (nbytes by adapter position) fit `max_total_bytes`. Cold adapters cost memory and little capacity
    wherever they ride."""
    kept = pool.hottest_first()
    size = nbytes[kept.adapter]
    need = int(size.sum())
    if need <= max_total_bytes:
        return kept, Pool.empty()
    fits = need - np.cumsum(size[::-1]) <= max_total_bytes   # after shedding the last 1, 2, ... pieces
    num_shed = int(np.argmax(fits)) + 1 if fits.any() else len(kept)
    index = np.arange(len(kept))
    return kept.take(index[:len(kept) - num_shed]), kept.take(index[::-1][:num_shed])


def carve(pool: Pool, excess: float, demand: np.ndarray) -> tuple[Pool, Pool]:
    """Split `excess` tokens/s off the hottest pieces of `pool`: (kept hottest first, carved). Riding on other
    replicas costs a copy of the adapter there, so few hot pieces ride rather than many cold adapters."""
    ordered = pool.hottest_first()
    amounts, tols = ordered.amount.tolist(), (EPS * demand[ordered.adapter]).tolist()
    kept, carved = [], []   # (index into ordered, tokens/s)
    i = 0
    while i < len(amounts) and excess > 0:   # once the excess is gone, every other piece stays whole
        amount, tol = amounts[i], tols[i]
        take = min(amount, excess)
        if take > tol:
            carved.append((i, take))
            excess -= take
        if amount - take > tol:
            kept.append((i, amount - take))
        i += 1

    def pieces(split: list[tuple[int, float]], rest: np.ndarray) -> Pool:
        index = np.r_[np.array([j for j, _ in split], dtype=np.int64), rest]
        return Pool(ordered.adapter[index], np.r_[np.array([x for _, x in split]), ordered.amount[rest]],
                    ordered.cls[index])

    return pieces(kept, np.arange(i, len(amounts))).hottest_first(), pieces(carved, np.zeros(0, dtype=np.int64))


class PreviousEntries:
    """The previous table's entries of the adapters that Items.tuples handed to the one-at-a-time paths, read from
    its columns by input position (`rows`: each position's row there, -1: none): no id -> row dict of the whole
    previous table. get() as Mapping.get."""

    __slots__ = ("position", "columns", "rows")

    def __init__(self, position: dict[str, int], columns, rows: np.ndarray) -> None:
        self.position, self.columns, self.rows = position, columns, rows

    def get(self, adapter_id: str, default=None):
        k = self.position.get(adapter_id)
        row = -1 if k is None else int(self.rows[k])
        return self.columns.entry(row) if row >= 0 else default
