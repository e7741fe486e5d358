"""Rank-aware placement solver: LoRAServe Algorithm 1 (Sec. IV-A), steps 1-6, as one pure function.

(1) demand per adapter (tokens/s, given); (2) per-rank-class replica budgets from operating points (budgets.py:
largest remainder, memory floors, the lowest balanced level); (3) fractional bin packing of each class onto its
replicas at that level, what does not fit riding on the next class up (packing.py); (4) leftovers at rising levels:
same class, higher classes, then anywhere, never above an operating point unless the demand exceeds every one;
(5) permutation of replicas that keeps the most traffic where the previous table had it (Hungarian method);
(6) the RoutingTable. Capacities include crowding (bins.py) when the operating points were profiled for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafleet.infra.errors import InvalidPlacement, PlacementInfeasible
from lorafleet.placement.assignment import class_assignment, max_weight_assignment
from lorafleet.placement.bins import EPS, AdapterLoad, Bins
from lorafleet.placement.budgets import MEMORY_FILL, class_budgets
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.packing import Piece, carve, overload, pack_class, shed_memory, spill
from lorafleet.placement.routing_table import RoutingTable

OVERLOAD_TOLERANCE = 1e-6  # utilisation above 1 + this is an overload, below it float rounding


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
    target_utilization: float = 0.0  # Σ_c D_c / cap_c over the replicas: the rank-isolated ideal
    balanced_utilization: float = 0.0  # step 2's level with these budgets (low ranks riding on higher ones)
    max_utilization: float = 0.0  # predicted, the busiest replica
    is_overloaded: bool = False  # some replica is predicted above its operating point (demand beyond capacity)
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
    filled to the balanced level of step 2 (at least `min_fill`, so light load is not smeared over every
    replica); pieces under `min_share` of an adapter are not split off (a last pass does, before any overload).
    `is_overloaded` says that some replica is predicted above its operating point: only when the demand (or the
    memory) leaves no other way.
    """
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise InvalidPlacement(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    max_bytes = int(max_adapter_bytes or points.max_adapter_bytes)
    ids = [a.adapter_id for a in adapters]
    if len(set(ids)) != len(ids):
        raise InvalidPlacement("adapters: the same adapter_id appears twice")
    items = [a for a in adapters if a.tokens_per_s > 0]
    rank_class = {r: points.rank_class(r) for r in {a.rank for a in items}}
    default_bytes = {r: points.adapter_bytes(r) for r in rank_class}
    size = {a.adapter_id: a.size_bytes or default_bytes[a.rank] for a in items}
    too_big = [a for a in items if size[a.adapter_id] > max_bytes]
    if too_big:
        a = too_big[0]
        raise PlacementInfeasible(
            f"adapter '{a.adapter_id}' needs {size[a.adapter_id]} bytes, above the {max_bytes} bytes of adapter "
            "memory of every replica"
        )
    # Step 1 input order: demand descending, ties broken by a seeded hash (deterministic per seed).
    _sort_by_demand(items, seed)
    by_class: dict[int, list[AdapterLoad]] = {}
    for a in items:
        by_class.setdefault(rank_class[a.rank], []).append(a)

    # Step 2: replicas per class (largest remainder, memory floors) and the balanced level u they reach when
    # low ranks may ride on higher-rank replicas; target t = Σ_c D_c/cap_c / R is the rank-isolated ideal.
    demand = {c: sum(a.tokens_per_s for a in group) for c, group in by_class.items()}
    class_bytes = {c: sum(size[a.adapter_id] for a in group) for c, group in by_class.items()}
    before = {int(c): int(b) for c, b in (previous.meta.get("class_budgets") or {}).items()} if previous else None
    budget, balanced = class_budgets(demand, class_bytes, points.points, num_replicas, max_bytes, before, min_fill)
    target = sum(d / points.points[c] for c, d in demand.items()) / num_replicas
    fill = max(balanced, min_fill)
    bins = Bins(num_replicas, points, max_bytes, fill)

    # Step 3: classes from the lowest rank up, each onto its replicas at the level `fill`; what exceeds the class's
    # memory (its coldest adapters) or room (pieces of its hottest) rides on the next class up. With a previous
    # table, classes keep the replicas that served them and adapters stay put where room allows.
    members = _class_members(budget, by_class, previous, num_replicas)
    old_entries = previous.entries if previous is not None else {}
    carry: list[Piece] = []
    leftovers: list[Piece] = []
    for c in sorted(set(by_class) | set(budget)):
        pool = [(a, a.tokens_per_s, c) for a in by_class.get(c, ())] + carry
        room = points.points[c] * fill
        num_members = len(members.get(c, ()))
        carry = []
        if any(budget.get(h, 0) for h in budget if h > c):   # a class above can take what does not fit here
            pool, carry = shed_memory(pool, MEMORY_FILL * max_bytes * num_members, size)
            excess = sum(amount for _, amount, _ in pool) - room * num_members
            if excess > EPS * room:
                pool, hot = carve(pool, excess)
                carry += hot
        leftovers += pack_class(bins, pool, members.get(c, []), c, fill * (1 + EPS), size, min_share, old_entries)
    leftovers += carry

    # Step 4: leftovers (memory, crumbs, the top class's excess), highest rank class first: same class, higher
    # classes, then any replica, never above an operating point; then without the min_share crumb rule; only
    # demand that fits under no operating point goes to the least utilised replica (is_overloaded).
    leftovers.sort(key=lambda x: (-x[2], -x[1]))
    for item, amount, cls in leftovers:
        nbytes = size[item.adapter_id]
        rest = spill(bins, item, amount, cls, nbytes, min_share)
        if rest > EPS * item.tokens_per_s:
            rest = spill(bins, item, rest, cls, nbytes, 0.0)
        if rest > EPS * item.tokens_per_s:
            overload(bins, item, rest, cls, nbytes)

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
            # rounded: float noise of the packing (1e-16) must not read as a move between two tables
            entries.setdefault(adapter_id, []).append((int(perm[v]), round(amount / placed[adapter_id], 12)))
    table_entries = {a: tuple(e) if len(e) == 1 else tuple(sorted(e)) for a, e in sorted(entries.items())}
    inverse = np.empty(num_replicas, dtype=np.int64)
    inverse[perm] = np.arange(num_replicas)
    util = bins.utilization()
    max_util = float(util.max()) if num_replicas else 0.0
    is_overloaded = max_util > 1.0 + OVERLOAD_TOLERANCE
    placement_meta = {
        "solver": "rank-aware",
        "seed": seed,
        "target_utilization": round(target, 6),
        "max_utilization": round(max_util, 6),
        "is_overloaded": is_overloaded,
        "class_budgets": {str(c): b for c, b in sorted(budget.items())},
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
        balanced_utilization=balanced,
        max_utilization=max_util,
        is_overloaded=is_overloaded,
        num_spilled=len(leftovers),
        permutation=tuple(int(p) for p in perm),
    )


def _tiebreak(seed: int, adapter_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{adapter_id}".encode(), digest_size=8).digest()


def _sort_by_demand(items: list[AdapterLoad], seed: int) -> None:
    """Sort in place by demand descending, equal demands by _tiebreak: the order of the key (-demand, tiebreak),
    hashing only the adapters that tie (few, with measured demand)."""
    items.sort(key=lambda a: -a.tokens_per_s)
    lo = 0
    while lo < len(items):
        hi = lo + 1
        while hi < len(items) and items[hi].tokens_per_s == items[lo].tokens_per_s:
            hi += 1
        if hi - lo > 1:
            items[lo:hi] = sorted(items[lo:hi], key=lambda a: _tiebreak(seed, a.adapter_id))
        lo = hi


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
    # the spare replicas (beyond the budgets) form one more class that scores 0 everywhere
    spare = num_replicas - sum(budget[c] for c in classes)
    owner = class_assignment(np.vstack([score, np.zeros((1, num_replicas))]),
                             np.array([budget[c] for c in classes] + [spare], dtype=np.int64))
    return {c: [int(p) for p in np.flatnonzero(owner == row)] for row, c in enumerate(classes)}   # ascending


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
    return max_weight_assignment(_strongest_edges(weight, PERMUTATION_EDGES))


PERMUTATION_EDGES = 64   # step 5 keeps each virtual replica's heaviest edges (and its own index) for the assignment


def _strongest_edges(weight: np.ndarray, k: int) -> np.ndarray:
    """weight with all but each row's k largest entries and its diagonal zeroed. The diagonal keeps the identity
    available (step 3 already packs classes onto the replicas that served them), so the assignment on what is kept
    is never worse than the identity; the heaviest edges are where traffic stays. Without this, at 4,096 replicas
    the exact assignment over every edge took ~3/4 of a warm solve."""
    n_rows, n_cols = weight.shape
    if n_cols <= k + 1:
        return weight
    keep = np.argpartition(weight, n_cols - k, axis=1)[:, n_cols - k:]
    pruned = np.zeros_like(weight)
    rows = np.arange(n_rows)[:, None]
    pruned[rows, keep] = weight[rows, keep]
    diagonal = np.arange(min(n_rows, n_cols))
    pruned[diagonal, diagonal] = weight[diagonal, diagonal]
    return pruned
