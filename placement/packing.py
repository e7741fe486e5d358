"""Steps 3 and 4 of the solver: fractional bin packing per rank class, and the spill of leftovers."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from lorafleet.infra.errors import InvalidPlacement, PlacementInfeasible
from lorafleet.placement.operating_points import OperatingPoints


@dataclass(frozen=True, slots=True)
class AdapterLoad:
    """Solver input for one adapter: demand in tokens/s; size_bytes 0 = rank x the points' bytes per rank."""

    adapter_id: str
    rank: int
    tokens_per_s: float
    size_bytes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidPlacement(f"adapter '{self.adapter_id}': rank must be an integer >= 1, got {self.rank!r}")
        if not (math.isfinite(self.tokens_per_s) and self.tokens_per_s >= 0):
            raise InvalidPlacement(f"adapter '{self.adapter_id}': tokens_per_s must be finite and >= 0")
        if self.size_bytes < 0:
            raise InvalidPlacement(f"adapter '{self.adapter_id}': size_bytes must be >= 0")


EPS = 1e-9
LEVEL_STEP = 0.02  # step 4 raises the fill level in 2% steps


class Bins:
    """Virtual replicas during packing: load, memory, max rank class and the pieces each holds."""

    def __init__(self, num: int, points: OperatingPoints, max_bytes: int, fill: float) -> None:
        self.points, self.max_bytes, self.fill = points, max_bytes, fill
        self.load = np.zeros(num)
        self.mem = np.zeros(num, dtype=np.int64)
        self.cls = np.zeros(num, dtype=np.int64)  # max rank class held (0 = empty)
        self.pieces: list[dict[str, float]] = [{} for _ in range(num)]
        self.where: dict[str, set[int]] = {}  # adapter -> replicas holding a piece of it
        top = max(points.points)
        self.cap_of_class = np.full(top + 1, np.inf)  # class 0 (empty replica) has no limit yet
        for c, cap in points.points.items():
            self.cap_of_class[c] = cap

    def can_hold(self, v: int, adapter_id: str, size: int) -> bool:
        return adapter_id in self.pieces[v] or self.mem[v] + size <= self.max_bytes

    def put(self, v: int, item: AdapterLoad, size: int, amount: float, cls: int) -> None:
        if item.adapter_id not in self.pieces[v]:
            self.mem[v] += size
            self.pieces[v][item.adapter_id] = 0.0
            self.where.setdefault(item.adapter_id, set()).add(v)
        self.pieces[v][item.adapter_id] += amount
        self.load[v] += amount
        self.cls[v] = max(self.cls[v], cls)

    def capacity(self, cls: np.ndarray) -> np.ndarray:
        """Max tokens/s of replicas whose max rank classes are `cls` (inf for empty replicas)."""
        return self.cap_of_class[cls]

    def memory_ok(self, adapter_id: str, size: int) -> np.ndarray:
        ok = self.mem + size <= self.max_bytes
        ok[list(self.where.get(adapter_id, ()))] = True
        return ok


def pack_class(bins, group, members, cls, room_per_replica, size, min_share, previous):
    """Fractional LPT of `group` onto `members`, an adapter's previous replicas first (less churn);
    returns the (adapter, tokens/s) that did not fit."""
    room = {v: room_per_replica for v in members}
    heap = [(-room_per_replica, v) for v in members]
    heapq.heapify(heap)
    leftovers = []
    for item in group:
        remaining, last, nbytes = item.tokens_per_s, None, size[item.adapter_id]
        min_piece, tol = min_share * item.tokens_per_s, EPS * item.tokens_per_s
        old = previous.get(item.adapter_id, ())
        for v, p_old in sorted(old, key=lambda e: -e[1]):  # sticky: stay where it was if there is room
            if v in room and remaining > tol and bins.can_hold(v, item.adapter_id, nbytes):
                cap = item.tokens_per_s * p_old if len(old) > 1 else remaining
                amount = min(remaining, room[v], cap)
                if amount >= min(min_piece, remaining) and amount > tol:
                    bins.put(v, item, nbytes, amount, cls)
                    room[v] -= amount
                    heapq.heappush(heap, (-room[v], v))
                    remaining -= amount
                    last = v
        while remaining > tol:
            if last is not None and remaining < min_piece:  # a crumb: keep it with the last piece
                bins.put(last, item, nbytes, remaining, cls)
                room[last] -= remaining
                break
            skipped, found = [], None
            while heap:
                neg_room, v = heapq.heappop(heap)
                if -neg_room != room[v]:
                    continue  # stale entry (a sticky placement changed the room)
                if bins.can_hold(v, item.adapter_id, nbytes):
                    found = v
                    break
                skipped.append((neg_room, v))
            for entry in skipped:
                heapq.heappush(heap, entry)
            free = room[found] if found is not None else 0.0
            if found is None or free <= tol or (free < min_piece and free < remaining):
                if found is not None:
                    heapq.heappush(heap, (-free, found))
                leftovers.append((item, remaining))
                break
            amount = min(remaining, free)
            if remaining - amount >= remaining:  # below float resolution: take it all (terminates)
                amount = remaining
            bins.put(found, item, nbytes, amount, cls)
            room[found] = free - amount
            heapq.heappush(heap, (-room[found], found))
            remaining -= amount
            last = found
    return leftovers


def spill(bins, item, amount, cls, nbytes, min_share) -> None:
    """Step 4 for one leftover piece: replicas already at >= its rank class first, then any replica; each
    at rising fill levels (2% steps up to full SLO capacity, closest class first), so the overflow is
    spread evenly instead of pushing one replica to its limit; split across replicas when needed."""
    remaining, min_piece, tol = amount, min_share * item.tokens_per_s, EPS * item.tokens_per_s
    mem_ok = bins.memory_ok(item.adapter_id, nbytes)
    if not mem_ok.any():
        raise PlacementInfeasible(
            f"adapter '{item.adapter_id}' ({nbytes} bytes) fits in no replica's remaining adapter memory "
            f"({bins.max_bytes} bytes each); add replicas or adapter memory"
        )
    top = max(1.0, bins.fill)
    levels = [*np.arange(bins.fill, top, LEVEL_STEP).tolist(), top]
    for same_or_higher in (True, False):
        for level in levels:
            while remaining > tol:
                new_cls = np.maximum(bins.cls, cls)
                room = level * bins.capacity(new_cls) - bins.load
                ok = mem_ok & (room > 0) & (room >= max(tol, min(min_piece, remaining) - tol))
                if same_or_higher:
                    ok &= bins.cls >= cls
                if not ok.any():
                    break
                candidates = np.flatnonzero(ok)
                closest = candidates[new_cls[candidates] == new_cls[candidates].min()]
                v = int(closest[np.argmax(room[closest])])  # closest class (least capacity used), most room
                put = remaining if remaining - room[v] < min_piece else min(remaining, float(room[v]))
                if remaining - put >= remaining:  # a piece below float resolution: take it all (terminates)
                    put = remaining
                bins.put(v, item, nbytes, put, cls)
                mem_ok[v] = True
                remaining -= put
            if remaining <= tol:
                return
    # Overloaded: the replica with the lowest utilization after taking the rest.
    new_cls = np.maximum(bins.cls, cls)
    after = (bins.load + remaining) / bins.capacity(new_cls)
    after[~mem_ok] = np.inf
    bins.put(int(np.argmin(after)), item, nbytes, remaining, cls)
