"""Rank-aware placement solver: LoRAServe Algorithm 1 (Sec. IV-A), steps 1-6, as one pure function.

(1) demand per adapter (tokens/s, given); (2) per-rank-class replica budgets from operating points (budgets.py:
largest remainder, memory floors, the lowest balanced level); (3) fractional bin packing of each class onto its
replicas at that level, what does not fit riding on the next class up (packing.py); (4) leftovers at rising levels:
same class, higher classes, then anywhere, never above an operating point unless the demand exceeds every one;
(5) permutation of replicas that keeps the most traffic where the previous table had it (exact, sparse LAPJV);
(6) the RoutingTable. Capacities include crowding (bins.py) when the operating points were profiled for it.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafleet.infra.errors import InvalidPlacement, PlacementInfeasible
from lorafleet.placement.assignment import class_assignment, sparse_max_weight_assignment
from lorafleet.placement.bins import EPS, AdapterLoad, Bins
from lorafleet.placement.budgets import MEMORY_FILL, class_budgets
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.packing import expand_rows, overload, pack_class, spill
from lorafleet.placement.pool import Items, Piece, Pool, PreviousEntries, carve, shed_memory
from lorafleet.placement.routing_table import RoutingTable, TableColumns

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
    adapters = adapters if isinstance(adapters, list | tuple) else list(adapters)
    ids = list(map(operator.attrgetter("adapter_id"), adapters))
    by_id = sorted(range(len(ids)), key=ids.__getitem__)   # the table's order; linear when the input is sorted
    sorted_ids = [ids[k] for k in by_id]
    if any(map(operator.eq, sorted_ids[1:], sorted_ids[:-1])):
        raise InvalidPlacement("adapters: the same adapter_id appears twice")
    demand = np.fromiter(map(operator.attrgetter("tokens_per_s"), adapters), dtype=np.float64, count=len(adapters))
    with_demand = np.flatnonzero(demand > 0)   # input positions
    ranks = np.fromiter(map(operator.attrgetter("rank"), adapters), dtype=np.int64, count=len(adapters))[with_demand]
    is_small = len(ranks) and ranks.max() < 1 << 16   # few small integers: a count, not np.unique's sort
    unique_ranks = (np.flatnonzero(np.bincount(ranks)) if is_small else np.unique(ranks)).tolist()
    rank_classes = [points.rank_class(r) for r in unique_ranks]
    class_of = np.array(rank_classes, dtype=np.int64)[np.searchsorted(unique_ranks, ranks)]
    default_bytes = np.array([points.adapter_bytes(r) for r in unique_ranks], dtype=np.int64)
    nbytes = np.zeros(len(adapters), dtype=np.int64)
    given = np.fromiter(map(operator.attrgetter("size_bytes"), adapters), dtype=np.int64,
                        count=len(adapters))[with_demand]
    nbytes[with_demand] = np.where(given > 0, given, default_bytes[np.searchsorted(unique_ranks, ranks)])
    too_big = with_demand[nbytes[with_demand] > max_bytes]
    if len(too_big):
        k = int(too_big[0])
        raise PlacementInfeasible(
            f"adapter '{ids[k]}' needs {nbytes[k]} bytes, above the {max_bytes} bytes of adapter memory of every "
            "replica"
        )
    items = Items(adapters, demand, nbytes)
    # Step 1 input order: demand descending, ties broken by a seeded hash (deterministic per seed).
    order = _sort_by_demand(with_demand, demand, ids, seed)
    order_cls = np.empty(len(adapters), dtype=np.int64)
    order_cls[with_demand] = class_of
    order_cls = order_cls[order]
    # input positions, hottest first; the classes in the order of their hottest adapter (the order of the sums below)
    in_class = {c: order_cls == c for c in sorted(set(rank_classes))}
    by_class = {c: order[in_class[c]] for c in sorted(in_class, key=lambda c: int(np.argmax(in_class[c])))}

    # Step 2: replicas per class (largest remainder, memory floors) and the balanced level u they reach when
    # low ranks may ride on higher-rank replicas; target t = Σ_c D_c/cap_c / R is the rank-isolated ideal.
    class_demand = {c: float(np.cumsum(demand[group])[-1]) for c, group in by_class.items()}   # summed in order
    class_bytes = {c: int(nbytes[group].sum()) for c, group in by_class.items()}
    before = {int(c): int(b) for c, b in (previous.meta.get("class_budgets") or {}).items()} if previous else None
    budget, balanced = class_budgets(class_demand, class_bytes, points.points, num_replicas, max_bytes, before,
                                     min_fill)
    target = sum(d / points.points[c] for c, d in class_demand.items()) / num_replicas
    fill = max(balanced, min_fill)
    bins = Bins(num_replicas, points, max_bytes, fill, items.position, len(adapters))

    # Step 3: classes from the lowest rank up, each onto its replicas at the level `fill`; what exceeds the class's
    # memory (its coldest adapters) or room (pieces of its hottest) rides on the next class up. With a previous
    # table, classes keep the replicas that served them and adapters stay put where room allows.
    by_id = np.fromiter(by_id, dtype=np.int64, count=len(by_id))
    in_table = demand[by_id] > 0
    table_ids = sorted_ids if in_table.all() else [x for x, keep in zip(sorted_ids, in_table.tolist(), strict=True)
                                                   if keep]
    by_id = by_id[in_table]   # input positions of the table's rows
    row_of = np.full(len(adapters), -1, dtype=np.int64)   # each input position's row in the new table, -1: none
    row_of[by_id] = np.arange(len(by_id))
    previous_rows = None   # (the previous table's columns, each input position's row there or -1)
    old_entries = {}
    if previous is not None and previous.entries:
        columns = previous.columns()
        # the same adapters (a list compare, no lookups): a row there is the row here
        rows = row_of if columns.adapter_ids == table_ids else columns.rows_of(ids)
        previous_rows = (columns, rows)
        old_entries = PreviousEntries(items.position, columns, rows)
    members = _class_members(budget, by_class, demand, previous_rows, num_replicas)
    carry = Pool.empty()
    leftovers: list[Piece] = []
    for c in sorted(set(by_class) | set(budget)):
        group = by_class.get(c, np.zeros(0, dtype=np.int64))
        pool = Pool(group, demand[group], np.full(len(group), c, dtype=np.int64)) + carry
        room = points.points[c] * fill
        num_members = len(members.get(c, ()))
        carry = Pool.empty()
        if any(budget.get(h, 0) for h in budget if h > c):   # a class above can take what does not fit here
            pool, carry = shed_memory(pool, MEMORY_FILL * max_bytes * num_members, nbytes)
            excess = pool.total() - room * num_members
            if excess > EPS * room:
                pool, hot = carve(pool, excess, demand)
                carry = carry + hot
        leftovers += pack_class(bins, pool, members.get(c, []), c, fill * (1 + EPS), items, min_share, old_entries,
                                previous_rows)
    leftovers += items.tuples(carry)

    # Step 4: leftovers (memory, crumbs, the top class's excess), highest rank class first: same class, higher
    # classes, then any replica, never above an operating point; then without the min_share crumb rule; only
    # demand that fits under no operating point goes to the least utilised replica (is_overloaded).
    leftovers.sort(key=lambda x: (-x[2], -x[1]))
    for item, amount, cls in leftovers:
        size = items[item.adapter_id]
        rest = spill(bins, item, amount, cls, size, min_share)
        if rest > EPS * item.tokens_per_s:
            rest = spill(bins, item, rest, cls, size, 0.0)
        if rest > EPS * item.tokens_per_s:
            overload(bins, item, rest, cls, size)

    # Step 5: physical replica for each virtual one, keeping the most traffic where it was.
    piece_pos, piece_v, piece_amount = bins.placed()
    piece_row = row_of[piece_pos]
    piece_total = _adapter_totals(piece_row, piece_v, piece_amount)
    perm = _permutation(piece_v, piece_amount, piece_total, piece_pos, previous_rows, num_replicas)
    # Step 6: the table, as arrays (rows by adapter id, replicas ascending within a row).
    columns = _columns(table_ids, piece_row, perm[piece_v], piece_amount, piece_total)
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
    table = RoutingTable.from_columns(num_replicas, columns, version=version, meta=placement_meta)
    return Placement(
        table=table,
        replica_max_rank=tuple(int(bins.cls[v]) for v in inverse),
        replica_tokens_per_s=tuple(float(bins.load[v]) for v in inverse),
        replica_utilization=tuple(float(util[v]) for v in inverse),
        replica_adapter_bytes=tuple(int(bins.mem[v]) for v in inverse),
        replica_num_adapters=tuple(np.bincount(piece_v, minlength=num_replicas)[inverse].tolist()),
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


def _sort_by_demand(positions: np.ndarray, demand: np.ndarray, ids: list[str], seed: int) -> np.ndarray:
    """positions (ascending) by demand descending, equal demands by _tiebreak: the order of the key (-demand,
    tiebreak), hashing only the adapters that tie (few, with measured demand)."""
    order = positions[np.argsort(-demand[positions], kind="stable")]
    d = demand[order]
    starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for lo, hi in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist(), strict=True):
        order[lo:hi] = sorted(order[lo:hi].tolist(), key=lambda k: _tiebreak(seed, ids[k]))
    return order


def _class_members(budget, by_class, demand, previous_rows, num_replicas) -> dict[int, list[int]]:
    """Physical replicas of each class: consecutive without a previous table, else those that carried
    most of the class's traffic before (assignment of class slots to replicas)."""
    classes = sorted(budget)
    if previous_rows is None:
        members, first = {}, 0
        for c in classes:
            members[c] = list(range(first, first + budget[c]))
            first += budget[c]
        return members
    columns, rows = previous_rows
    # score[class, replica] = Σ demand x previous probability, added in the order of a loop over the classes, their
    # adapters (hottest first) and their previous pieces
    group = np.concatenate([by_class[c] for c in classes]) if classes else np.zeros(0, dtype=np.int64)
    row_of_class = np.repeat(np.arange(len(classes)), [len(by_class[c]) for c in classes])
    which, k = expand_rows(columns.offsets, rows[group])
    physical = columns.replicas[k]
    keep = physical < num_replicas
    which, physical, p_old = which[keep], physical[keep], columns.probabilities[k][keep]
    score = np.bincount(row_of_class[which] * num_replicas + physical, weights=demand[group][which] * p_old,
                        minlength=len(classes) * num_replicas).reshape(len(classes), num_replicas)
    # the spare replicas (beyond the budgets) form one more class that scores 0 everywhere
    spare = num_replicas - sum(budget[c] for c in classes)
    owner = class_assignment(np.vstack([score, np.zeros((1, num_replicas))]),
                             np.array([budget[c] for c in classes] + [spare], dtype=np.int64))
    return {c: [int(p) for p in np.flatnonzero(owner == row)] for row, c in enumerate(classes)}   # ascending


def _adapter_totals(row: np.ndarray, v: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """float64 [P]: each piece's adapter's tokens/s over all its pieces, summed in replica order (as a loop over
    the replicas would: the float the probabilities are rounded from)."""
    total = amount.copy()
    counts = np.bincount(row)
    split = np.flatnonzero(counts[row] > 1)   # pieces of adapters on several replicas: few
    if len(split):
        split = split[np.lexsort((v[split], row[split]))]
        sums: dict[int, float] = {}
        for r, x in zip(row[split].tolist(), amount[split].tolist(), strict=True):
            sums[r] = sums.get(r, 0.0) + x
        total[split] = [sums[r] for r in row[split].tolist()]
    return total


def _columns(table_ids: list[str], row: np.ndarray, physical: np.ndarray, amount: np.ndarray,
             total: np.ndarray) -> TableColumns:
    """The table's arrays from its pieces (row = index into table_ids, the sorted ids) on physical replicas."""
    order = np.lexsort((physical, row))
    row, physical, amount, total = row[order], physical[order], amount[order], total[order]
    probability = np.ones(len(row))
    split = np.flatnonzero(amount != total)
    # rounded: float noise of the packing (1e-16) must not read as a move between two tables
    probability[split] = [round(x / t, 12) for x, t in zip(amount[split].tolist(), total[split].tolist(),
                                                          strict=True)]
    offsets = np.zeros(len(table_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=len(table_ids)), out=offsets[1:])
    return TableColumns(table_ids, offsets, physical, probability)


def _permutation(v, amount, total, adapter, previous_rows, num_replicas) -> np.ndarray:
    """perm[virtual] = physical, maximising Σ_a demand_a · Σ_r min(p_new(a, r), p_old(a, r)); pieces as arrays
    (replica v, tokens/s, their adapter's total, its input position)."""
    if previous_rows is None:
        return np.arange(num_replicas)
    columns, rows = previous_rows
    which, k = expand_rows(columns.offsets, rows[adapter])
    physical = columns.replicas[k]
    keep = physical < num_replicas   # old replicas beyond the new count are gone
    which, physical, p_old = which[keep], physical[keep], columns.probabilities[k][keep]
    # weight[v, physical]: one entry per piece and old replica of its adapter; the assignment sums an edge's entries
    weight = total[which] * np.minimum(amount[which] / total[which], p_old)
    return sparse_max_weight_assignment(num_replicas, num_replicas, v[which], physical, weight)
