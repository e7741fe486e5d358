"""The solver's virtual replicas during packing (Bins) and its input record (AdapterLoad)."""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from lorafleet.infra.errors import InvalidPlacement
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


def interp(x: float, xs: list[float], fs: list[float]) -> float:
    """np.interp for one float on ascending xs, on plain lists: several times faster than numpy for a scalar (the
    packing loops call it per adapter piece)."""
    if x <= xs[0]:
        return fs[0]
    i = bisect_right(xs, x)
    if i == len(xs):
        return fs[-1]
    slope = (fs[i] - fs[i - 1]) / (xs[i] - xs[i - 1])
    return slope * (x - xs[i - 1]) + fs[i - 1]   # numpy's formula: the same float, bit for bit


class Bins:
    """Virtual replicas during packing: load, memory, max rank class, crowding and the pieces each holds.

    Capacity of a replica = its class's operating point x the crowding factor at its estimated distinct adapters
    per step, D = Σ_a 1 - (1 - share_a)^B (share_a of the replica's tokens at the fill level, B the profiled mean
    batch): the points were measured with 16 equally popular adapters; many cold adapters on one replica cost
    capacity, a replica serving one hot adapter has more (OperatingPoints.crowding; factor 1 when not profiled).
    """

    def __init__(self, num: int, points: OperatingPoints, max_bytes: int, fill: float,
                 position: dict[str, int] | None = None, num_items: int = 0) -> None:
        self.points, self.max_bytes, self.fill = points, max_bytes, fill
        self.load = np.zeros(num)
        self.mem = np.zeros(num, dtype=np.int64)
        self.cls = np.zeros(num, dtype=np.int64)  # max rank class held (0 = empty)
        self.distinct = np.zeros(num)  # D: estimated distinct adapters per step
        self.pieces: list[dict[str, float]] = [{} for _ in range(num)]
        self.where: dict[str, set[int]] = {}  # adapter -> replicas holding a piece of it
        # Adapters put whole by put_many and not touched since, by position k < num_items in the solver's input:
        # replica (-1: none) and tokens/s, outside `pieces` and `where` (a dict entry per adapter for most of a
        # large fleet was most of the cold spread's time); a one-at-a-time access first moves one in (_settle).
        # `position` maps the ids of the adapters handed to the one-at-a-time paths to their k (Items.tuples).
        self.position = {} if position is None else position
        self.home = np.full(num_items, -1, dtype=np.int64)
        self.home_amount = np.zeros(num_items)
        top = max(points.points)
        self.cap_of_class = np.full(top + 1, np.inf)  # class 0 (empty replica) has no limit yet
        self.curves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.curve_lists: dict[int, tuple[list[float], list[float]]] = {}   # the same, for interp()
        batches = []
        for c, cap in points.points.items():
            self.cap_of_class[c] = cap
            curve = points.crowding_curve(c)
            if curve is not None:
                self.curves[c] = (np.asarray(curve[0]), np.asarray(curve[1]))
                self.curve_lists[c] = ([float(x) for x in curve[0]], [float(f) for f in curve[1]])
                batches.append(curve[2])
        self.batch = float(np.mean(batches)) if batches else 0.0
        # shares are of a replica's load at the fill level, at the mean capacity (D does not depend on the class)
        self.share_unit = max(fill, EPS) * float(np.mean(list(points.points.values())))

    def _settle(self, adapter_id: str) -> None:
        """Move an adapter placed by put_many into `pieces` and `where` (before a one-at-a-time access)."""
        k = self.position.get(adapter_id)
        if k is None or self.home[k] < 0:
            return
        v = int(self.home[k])
        self.pieces[v][adapter_id] = float(self.home_amount[k])
        self.where[adapter_id] = {v}
        self.home[k] = -1

    def is_placed(self, adapters: np.ndarray) -> np.ndarray:
        """bool [len(adapters)]: whether each adapter (input position) holds a piece anywhere."""
        out = self.home[adapters] >= 0
        if self.where:
            ids = self.position   # the settled ones: few
            settled = np.array(sorted(ids[a] for a in self.where if a in ids), dtype=np.int64)
            out |= np.isin(adapters, settled)
        return out

    def can_hold(self, v: int, adapter_id: str, size: int) -> bool:
        self._settle(adapter_id)
        return adapter_id in self.pieces[v] or self.mem[v] + size <= self.max_bytes

    def presence(self, amount: float) -> float:
        """Expected steps-share holding an adapter of `amount` tokens/s on a replica: its contribution to D."""
        if not self.curves or amount <= 0:
            return 0.0
        return 1.0 - (1.0 - min(1.0, amount / self.share_unit)) ** self.batch

    def presences(self, amounts: np.ndarray) -> np.ndarray:
        """presence() of each amount (numpy's pow: within an ulp of the scalar one)."""
        if not self.curves:
            return np.zeros(len(amounts))
        out = 1.0 - (1.0 - np.minimum(1.0, amounts / self.share_unit)) ** self.batch
        return np.where(amounts > 0, out, 0.0)

    def put(self, v: int, item: AdapterLoad, size: int, amount: float, cls: int) -> None:
        self._settle(item.adapter_id)
        old = self.pieces[v].get(item.adapter_id)
        if old is None:
            old = 0.0
            self.mem[v] += size
            self.where.setdefault(item.adapter_id, set()).add(v)
        self.pieces[v][item.adapter_id] = old + amount
        self.distinct[v] += self.presence(old + amount) - self.presence(old)
        self.load[v] += amount
        self.cls[v] = max(self.cls[v], cls)

    def put_many(self, adapters: np.ndarray, v: np.ndarray, nbytes: np.ndarray, amount: np.ndarray, cls: np.ndarray,
                 presence: np.ndarray) -> None:
        """put() of whole pieces, one per adapter (input positions, on no replica yet), onto replicas v (a replica
        may repeat); nbytes, amount, cls and presence (presences()) are per piece."""
        np.add.at(self.mem, v, nbytes)
        np.add.at(self.load, v, amount)
        np.add.at(self.distinct, v, presence)
        np.maximum.at(self.cls, v, cls)
        self.home[adapters] = v
        self.home_amount[adapters] = amount

    def factor(self, cls: np.ndarray, distinct: np.ndarray) -> np.ndarray:
        """Crowding factor of replicas of classes `cls` at `distinct` adapters per step (1 where not profiled)."""
        out = np.ones(len(cls))
        for c, (xs, fs) in self.curves.items():
            mask = cls == c
            if mask.any():
                out[mask] = np.interp(distinct[mask], xs, fs)
        return out

    def capacity(self, cls: np.ndarray, distinct: np.ndarray | None = None) -> np.ndarray:
        """Max tokens/s of replicas whose max rank classes are `cls` (inf for empty replicas), with crowding."""
        cap = self.cap_of_class[cls]
        if not self.curves:
            return cap
        return cap * self.factor(cls, self.distinct if distinct is None else distinct)

    def free(self, v: int, cls: int, level: float) -> float:
        """Tokens/s replica v has left under `level` x its capacity as a class-`cls` replica (or its own if higher)."""
        new_cls = max(int(self.cls[v]), cls)
        cap = float(self.cap_of_class[new_cls])
        curve = self.curve_lists.get(new_cls)
        if curve is not None:
            cap *= interp(float(self.distinct[v]), *curve)
        return level * cap - float(self.load[v])

    def fit(self, v: int, adapter_id: str, want: float, cls: int, level: float) -> float:
        """The most of `want` tokens/s of `adapter_id` (class `cls`) that replica v takes staying at or under
        `level` x its capacity (its class raised to `cls` if lower, its D raised by the piece)."""
        new_cls = max(int(self.cls[v]), cls)
        cap = float(self.cap_of_class[new_cls])
        curve = self.curve_lists.get(new_cls)
        if curve is not None:
            self._settle(adapter_id)
            old = self.pieces[v].get(adapter_id, 0.0)
            d = float(self.distinct[v]) + self.presence(old + want) - self.presence(old)
            cap *= interp(d, *curve)
        return max(0.0, min(want, level * cap - float(self.load[v])))

    def placed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every piece: (adapter input positions [P] int64, replicas [P] int64, tokens/s [P] float64)."""
        position = self.position
        ids = [position[a] for pieces in self.pieces for a in pieces]
        where = [v for v, pieces in enumerate(self.pieces) for _ in range(len(pieces))]
        amounts = [x for pieces in self.pieces for x in pieces.values()]
        bulk = np.flatnonzero(self.home >= 0)
        return (np.r_[np.array(ids, dtype=np.int64), bulk], np.r_[np.array(where, dtype=np.int64), self.home[bulk]],
                np.r_[np.array(amounts, dtype=np.float64), self.home_amount[bulk]])

    def memory_ok(self, adapter_id: str, size: int) -> np.ndarray:
        self._settle(adapter_id)
        ok = self.mem + size <= self.max_bytes
        ok[list(self.where.get(adapter_id, ()))] = True
        return ok

    def utilization(self) -> np.ndarray:
        caps = self.capacity(self.cls)
        return np.where(self.load > 0, self.load / caps, 0.0)
