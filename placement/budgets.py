"""Step 2 of the solver: replicas per rank class (largest remainder, memory floors, lowest balanced level).

A class-c replica serves any rank <= c at class-c cost (padded kernels: the batch's max rank sets the step time),
so demand of a low class may ride on replicas of a higher class, never the other way. With b_c replicas of
class c and demand D_c tokens/s, the lowest level u at which every replica stays at or under u x its class's
operating point is  u = max_j  Σ_{c >= j} D_c / Σ_{c >= j} b_c · cap_c  (demand of the classes >= j can only be
served by replicas of the classes >= j; below that bound the carry from low to high classes always fits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

EPS = 1e-9
HYSTERESIS = 0.02  # keep the previous budgets while their level is within 2% of the best one
MEMORY_FILL = 0.9  # plan classes to 90% of adapter memory: split adapters need a copy on each of their replicas


def balanced_level(demand: Mapping[int, float], budget: Mapping[int, int], capacity: Mapping[int, float]) -> float:
    """Lowest utilisation u such that the demand fits when low classes may ride on higher-class replicas;
    inf when some demand has no replica of its class or above."""
    level = total_demand = total_capacity = 0.0
    for c in sorted(set(demand) | set(budget), reverse=True):
        total_demand += demand.get(c, 0.0)
        total_capacity += budget.get(c, 0) * capacity[c]
        if total_demand > 0:
            level = max(level, total_demand / total_capacity if total_capacity > 0 else math.inf)
    return level


def largest_remainder(quota: Mapping[int, float], seats: int) -> dict[int, int]:
    """Integers summing to `seats` (when Σ quota = seats): floors, then one more for the largest remainders
    (ties: the higher class, whose replicas can also carry lower ranks)."""
    out = {c: int(math.floor(q + EPS)) for c, q in quota.items()}
    spare = seats - sum(out.values())
    for c in sorted(quota, key=lambda c: (-(quota[c] - out[c]), -c))[: max(spare, 0)]:
        out[c] += 1
    return out


def memory_ok(budget: Mapping[int, int], required: Mapping[int, int]) -> bool:
    """Every suffix of classes (>= j) has the replicas its adapters' bytes need (low ranks may ride up)."""
    have = 0
    for c in sorted(required, reverse=True):
        have += budget.get(c, 0)
        if have < required[c]:
            return False
    return True


def class_budgets(demand: Mapping[int, float], class_bytes: Mapping[int, int], capacity: Mapping[int, float],
                  num_replicas: int, max_bytes: int, previous: Mapping[int, int] | None = None,
                  level_floor: float = 0.0) -> tuple[dict[int, int], float]:
    """(replicas per class, balanced level u) for the classes with demand > 0.

    1. quota_c = R · n_c / Σ n with n_c = D_c / cap_c (replicas of demand), rounded by largest remainder;
    2. memory: the classes >= j get at least ceil(Σ_{c >= j} bytes_c / (MEMORY_FILL · max_bytes)) replicas for
       every j (their adapters' bytes, with room for the copies of split adapters), moved up from the lower class
       furthest above its quota;
    3. single moves of one replica between classes while they lower u (the max utilisation), memory kept;
    4. hysteresis: the `previous` budgets stay when they hold the bytes and reach a level within 2% of the new one
       (or under `level_floor`, the solver's minimum fill), so demand noise does not flip replicas between classes.
    """
    classes = sorted(c for c, d in demand.items() if d > 0)
    if not classes:
        return {}, 0.0
    need = {c: demand[c] / capacity[c] for c in classes}
    total = sum(need.values())
    quota = {c: (need[c] / total if total > 0 else 1 / len(classes)) * num_replicas for c in classes}
    budget = largest_remainder(quota, num_replicas)
    required, suffix_bytes = {}, 0
    for c in reversed(classes):
        suffix_bytes += class_bytes.get(c, 0)
        required[c] = min(num_replicas, max(1, math.ceil(suffix_bytes / (MEMORY_FILL * max_bytes) - EPS)))
    for j, c in enumerate(reversed(classes)):   # top class first: fill each suffix's shortfall from below
        lower = classes[: len(classes) - 1 - j]
        while sum(budget[d] for d in classes if d >= c) < required[c]:
            donors = [d for d in lower if budget[d] > 0]
            if not donors:
                break
            donor = max(donors, key=lambda d: (budget[d] - quota[d], d))
            budget[donor] -= 1
            budget[c] += 1
    level = balanced_level(demand, budget, capacity)
    is_memory_ok = memory_ok(budget, required)
    for _ in range(num_replicas * len(classes)):
        best = None
        for src in classes:
            if budget[src] == 0:
                continue
            for dst in classes:
                if dst == src:
                    continue
                budget[src] -= 1
                budget[dst] += 1
                trial = balanced_level(demand, budget, capacity)
                if (trial < level * (1 - 1e-12) and (best is None or trial < best[0])
                        and (memory_ok(budget, required) or not is_memory_ok)):
                    best = (trial, src, dst)
                budget[src] += 1
                budget[dst] -= 1
        if best is None:
            break
        level, src, dst = best
        budget[src] -= 1
        budget[dst] += 1
    if previous is not None and set(previous) == set(classes) and sum(previous.values()) == num_replicas and (
            memory_ok(previous, required) or not is_memory_ok):
        kept = balanced_level(demand, previous, capacity)
        if kept <= max(level * (1 + HYSTERESIS), level_floor):
            return dict(previous), kept
    return budget, level
