"""diff(old, new): which adapters move between two routing tables, and how much traffic that churns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lorafleet.placement.routing_table import RoutingTable

# Moves smaller than this share of an adapter's traffic are rounding noise, not moves.
MOVE_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class AdapterMove:
    """One adapter whose routing changed; `moved_fraction` = total variation distance of old and new."""

    adapter_id: str
    old: dict[int, float]
    new: dict[int, float]
    moved_fraction: float

    @property
    def added_replicas(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.new) - set(self.old)))


@dataclass(frozen=True, slots=True)
class TableDiff:
    """Change from `old` to `new`. churn = demand-weighted share of traffic that now lands elsewhere."""

    old_version: int | None
    new_version: int
    added: tuple[str, ...]  # in new.entries, not in old.entries
    removed: tuple[str, ...]  # in old.entries, not in new.entries
    moves: tuple[AdapterMove, ...]
    churn: float
    num_new_placements: int  # (adapter, replica) pairs that need a load
    num_dropped_placements: int

    @property
    def num_moved(self) -> int:
        return len(self.moves)

    def to_dict(self, max_moves: int | None = None) -> dict:
        moves = self.moves if max_moves is None else self.moves[:max_moves]
        return {
            "old_version": self.old_version,
            "new_version": self.new_version,
            "churn": self.churn,
            "num_moved": self.num_moved,
            "num_added": len(self.added),
            "num_removed": len(self.removed),
            "num_new_placements": self.num_new_placements,
            "num_dropped_placements": self.num_dropped_placements,
            "added": list(self.added),
            "removed": list(self.removed),
            "moves": [
                {
                    "adapter_id": m.adapter_id,
                    "old": {str(r): round(p, 6) for r, p in sorted(m.old.items())},
                    "new": {str(r): round(p, 6) for r, p in sorted(m.new.items())},
                    "moved_fraction": round(m.moved_fraction, 6),
                }
                for m in moves
            ],
        }


def diff(old: RoutingTable | None, new: RoutingTable, demand: Mapping[str, float] | None = None) -> TableDiff:
    """Compare routing (explicit entries and consistent-hash defaults) of every adapter in either table.

    Each adapter's weight in `churn` is its demand (tokens/s) when given, else 1.
    """
    old_entries = old.entries if old is not None else {}
    ids = sorted(set(old_entries) | set(new.entries))
    moves: list[AdapterMove] = []
    weighted_moved = total_weight = 0.0
    num_new = num_dropped = 0
    for adapter_id in ids:
        p_old = old.probabilities(adapter_id) if old is not None else {}
        p_new = new.probabilities(adapter_id)
        overlap = sum(min(p, p_old.get(r, 0.0)) for r, p in p_new.items())
        moved = max(0.0, 1.0 - overlap) if p_old else 1.0
        weight = demand.get(adapter_id, 0.0) if demand is not None else 1.0
        weighted_moved += weight * moved
        total_weight += weight
        if moved > MOVE_EPSILON:
            moves.append(AdapterMove(adapter_id, p_old, p_new, moved))
        old_set = set(dict(old_entries[adapter_id])) if adapter_id in old_entries else set()
        new_set = set(dict(new.entries[adapter_id])) if adapter_id in new.entries else set()
        num_new += len(new_set - old_set)
        num_dropped += len(old_set - new_set)
    moves.sort(key=lambda m: (-(demand or {}).get(m.adapter_id, 0.0), -m.moved_fraction, m.adapter_id))
    return TableDiff(
        old_version=old.version if old is not None else None,
        new_version=new.version,
        added=tuple(a for a in ids if a in new.entries and a not in old_entries),
        removed=tuple(a for a in ids if a in old_entries and a not in new.entries),
        moves=tuple(moves),
        churn=weighted_moved / total_weight if total_weight > 0 else 0.0,
        num_new_placements=num_new,
        num_dropped_placements=num_dropped,
    )
