"""Rank-aware placement solver: LoRAServe Algorithm 1 (Sec. IV-A), steps 1-6, as one pure function.

(1) demand per adapter (tokens/s, given); (2) per-rank-class replica budgets from operating points;
(3) fractional bin packing of each class onto its replicas; (4) leftovers onto replicas whose max rank is
at least the adapter's (closest class first), then anywhere; (5) permutation of replicas that keeps the
most traffic where the previous table had it (Hungarian method); (6) the RoutingTable.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafleet.infra.errors import InvalidPlacement, PlacementInfeasible
from lorafleet.placement.assignment import max_weight_assignment
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.packing import EPS, AdapterLoad, Bins, pack_class, spill
from lorafleet.placement.routing_table import RoutingTable


@dataclass(frozen=True, slots=True)
class Placement:
    """Solver output: the table plus what it predicts per physical replica (index = replica rank)."""

    table: RoutingTable
    replica_max_rank: tuple[int, ...]  # 0 = no adapter placed
    replica_tokens_per_s: tuple[float, ...]
    replica_utilization: tuple[float, ...]  # tokens/s over the capacity of the replica's max rank class
    replica_adapter_bytes: tuple[int, ...]
    replica_num_adapters: tuple[int, ...]
    class_budgets: dict[int, int] = field(default_factory=dict)  # rank class -> replicas of step 2
    target_utilization: float = 0.0
    num_spilled: int = 0  # adapter pieces placed by step 4
    permutation: tuple[int, ...] = ()  # step 5: physical replica of each packed (virtual) replica

    def replica_rows(self) -> list[dict]:
        return [
            {
                "replica": i,
                "max_rank": self.replica_max_rank[i],
                "tokens_per_s": round(self.replica_tokens_per_s[i], 3),
                "utilization": round(self.replica_utilization[i], 4),
                "num_adapters": self.replica_num_adapters[i],
                "adapter_bytes": self.replica_adapter_bytes[i],
            }
            for i in range(len(self.replica_max_rank))
        ]


def solve(
    adapters: Sequence[AdapterLoad],
    points: OperatingPoints,
    num_replicas: int,
    previous: RoutingTable | None = None,
    seed: int = 0,
    max_adapter_bytes: int | None = None,
    min_fill: float = 0.5,
    min_share: float = 0.01,
) -> Placement:
    """Place every adapter with demand > 0 on `num_replicas` replicas; deterministic for (inputs, seed).

    Per-replica adapter memory (`max_adapter_bytes`, default the points') is a hard limit. Replicas are
    filled to the balanced utilization t = Σ demand/capacity over num_replicas (at least `min_fill`, so
    light load is not smeared over every replica); pieces under `min_share` of an adapter are not split off.
    """
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise InvalidPlacement(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    max_bytes = int(max_adapter_bytes or points.max_adapter_bytes)
    ids = [a.adapter_id for a in adapters]
    if len(set(ids)) != len(ids):
        raise InvalidPlacement("adapters: the same adapter_id appears twice")
    items = [a for a in adapters if a.tokens_per_s > 0]
    size = {a.adapter_id: a.size_bytes or points.adapter_bytes(a.rank) for a in items}
    too_big = [a for a in items if size[a.adapter_id] > max_bytes]
    if too_big:
        a = too_big[0]
        raise PlacementInfeasible(
            f"adapter '{a.adapter_id}' needs {size[a.adapter_id]} bytes, above the {max_bytes} bytes of adapter "
            "memory of every replica"
        )
    # Step 1 input order: demand descending, ties broken by a seeded hash (deterministic per seed).
    items.sort(key=lambda a: (-a.tokens_per_s, _tiebreak(seed, a.adapter_id)))
    by_class: dict[int, list[AdapterLoad]] = {}
    for a in items:
        by_class.setdefault(points.rank_class(a.rank), []).append(a)

    # Step 2: fractional replicas per class n_c = D_c / cap_c; scale to fill all replicas evenly (target t);
    # floor, then round up the highest ranks first so low-rank leftovers can ride on high-rank replicas.
    need = {c: sum(a.tokens_per_s for a in group) / points.points[c] for c, group in by_class.items()}
    total_need = sum(need.values())
    target = total_need / num_replicas if total_need > 0 else 0.0
    share = {c: n * num_replicas / total_need for c, n in need.items()} if total_need > 0 else {}
    budget = {c: int(math.floor(m + EPS)) for c, m in share.items()}
    spare = num_replicas - sum(budget.values())
    for c in sorted(share, reverse=True):
        if spare > 0 and share[c] - budget[c] > EPS:
            budget[c] += 1
            spare -= 1
    fill = max(target, min_fill)
    bins = Bins(num_replicas, points, max_bytes, fill)
    leftovers: list[tuple[AdapterLoad, float]] = []

    # Step 3: per class, fractional LPT: whole adapter on the replica with most room if it fits, else split;
    # with a previous table, classes keep the replicas that served them and adapters stay put where room allows.
    members = _class_members(budget, by_class, previous, num_replicas)
    old_entries = previous.entries if previous is not None else {}
    for c in sorted(by_class):
        room = points.points[c] * fill
        leftovers += pack_class(bins, by_class[c], members.get(c, []), c, room, size, min_share, old_entries)

    # Step 4: leftovers, highest rank class first, onto replicas already at >= their rank, then anywhere.
    leftovers.sort(key=lambda x: (-points.rank_class(x[0].rank), -x[1]))
    for item, amount in leftovers:
        spill(bins, item, amount, points.rank_class(item.rank), size[item.adapter_id], min_share)

    # Step 5: physical replica for each virtual one, keeping the most traffic where it was.
    perm = _permutation(bins, previous, num_replicas)
    # Step 6: the table.
    placed: dict[str, float] = {}
    for pieces in bins.pieces:
        for adapter_id, amount in pieces.items():
            placed[adapter_id] = placed.get(adapter_id, 0.0) + amount
    entries: dict[str, list[tuple[int, float]]] = {}
    for v, pieces in enumerate(bins.pieces):
        for adapter_id, amount in pieces.items():
            entries.setdefault(adapter_id, []).append((int(perm[v]), amount / placed[adapter_id]))
    table_entries = {a: tuple(sorted(e)) for a, e in sorted(entries.items())}
    inverse = np.empty(num_replicas, dtype=np.int64)
    inverse[perm] = np.arange(num_replicas)
    caps = bins.capacity(bins.cls)
    util = np.where(bins.load > 0, bins.load / caps, 0.0)
    placement_meta = {
        "solver": "rank-aware",
        "seed": seed,
        "target_utilization": round(target, 6),
        "replica_max_rank": [int(bins.cls[v]) for v in inverse],
        "replica_tokens_per_s": [round(float(bins.load[v]), 3) for v in inverse],
    }
    version = previous.version + 1 if previous is not None else 1
    table = RoutingTable(num_replicas, table_entries, version=version, meta=placement_meta)
    return Placement(
        table=table,
        replica_max_rank=tuple(int(bins.cls[v]) for v in inverse),
        replica_tokens_per_s=tuple(float(bins.load[v]) for v in inverse),
        replica_utilization=tuple(float(util[v]) for v in inverse),
        replica_adapter_bytes=tuple(int(bins.mem[v]) for v in inverse),
        replica_num_adapters=tuple(len(bins.pieces[v]) for v in inverse),
        class_budgets=dict(sorted(budget.items())),
        target_utilization=target,
        num_spilled=len(leftovers),
        permutation=tuple(int(p) for p in perm),
    )


def _tiebreak(seed: int, adapter_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{adapter_id}".encode(), digest_size=8).digest()


def _class_members(budget, by_class, previous, num_replicas) -> dict[int, list[int]]:
    """Physical replicas of each class: consecutive without a previous table, else those that carried
    most of the class's traffic before (assignment of class slots to replicas)."""
    classes = sorted(budget)
    if previous is None or not previous.entries:
        members, first = {}, 0
        for c in classes:
            members[c] = list(range(first, first + budget[c]))
            first += budget[c]
        return members
    score = np.zeros((len(classes), num_replicas))
    for row, c in enumerate(classes):
        for item in by_class[c]:
            for physical, p_old in previous.entries.get(item.adapter_id, ()):
                if physical < num_replicas:
                    score[row, physical] += item.tokens_per_s * p_old
    slot_class = [row for row, c in enumerate(classes) for _ in range(budget[c])]
    slots = np.zeros((num_replicas, num_replicas))  # rows beyond the budgets are spare replicas (score 0)
    slots[: len(slot_class)] = score[slot_class]
    perm = max_weight_assignment(slots)
    members = {c: [] for c in classes}
    for slot, row in enumerate(slot_class):
        members[classes[row]].append(int(perm[slot]))
    return {c: sorted(v) for c, v in members.items()}


def _permutation(bins: Bins, previous: RoutingTable | None, num_replicas: int) -> np.ndarray:
    """perm[virtual] = physical, maximising Σ_a demand_a · Σ_r min(p_new(a, r), p_old(a, r))."""
    if previous is None or not previous.entries:
        return np.arange(num_replicas)
    weight = np.zeros((num_replicas, num_replicas))  # old replicas beyond the new count are gone
    totals: dict[str, float] = {}
    for pieces in bins.pieces:
        for adapter_id, amount in pieces.items():
            totals[adapter_id] = totals.get(adapter_id, 0.0) + amount
    for v, pieces in enumerate(bins.pieces):
        for adapter_id, amount in pieces.items():
            old = previous.entries.get(adapter_id)
            if old is None:
                continue
            total = totals[adapter_id]
            for physical, p_old in old:
                if physical < num_replicas:
                    weight[v, physical] += total * min(amount / total, p_old)
    return max_weight_assignment(weight)
