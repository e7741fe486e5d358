"""Steps 3 and 4 of the solver: fractional bin packing per rank class, and the spill of leftovers."""

from __future__ import annotations

import heapq

import numpy as np

from lorafleet.infra.errors import PlacementInfeasible
from lorafleet.placement.bins import EPS, AdapterLoad
from lorafleet.placement.budgets import MEMORY_FILL

LEVEL_STEP = 0.02  # step 4 raises the fill level in 2% steps


Piece = tuple[AdapterLoad, float, int]  # (adapter, tokens/s of this piece, its rank class)


def carve(pool: list[Piece], excess: float) -> tuple[list[Piece], list[Piece]]:
    """Split `excess` tokens/s off the hottest pieces of `pool`: (kept, carved). Riding on other replicas costs
    a copy of the adapter there, so few hot pieces ride rather than many cold adapters."""
    kept, carved = [], []
    ordered = sorted(pool, key=lambda x: -x[1])
    i = 0
    while i < len(ordered) and excess > 0:   # once the excess is gone, every other piece stays whole
        item, amount, cls = ordered[i]
        take = min(amount, excess)
        if take > EPS * item.tokens_per_s:
            carved.append((item, take, cls))
            excess -= take
        if amount - take > EPS * item.tokens_per_s:
            kept.append((item, amount - take, cls))
        i += 1
    kept += ordered[i:]
    kept.sort(key=lambda x: -x[1])
    return kept, carved


def shed_memory(pool: list[Piece], max_total_bytes: float, size: dict[str, int]) -> tuple[list[Piece], list[Piece]]:
    """Move the coldest whole pieces off `pool` until its adapters' bytes fit `max_total_bytes`: (kept, shed).
    Cold adapters cost memory and little capacity wherever they ride."""
    kept = sorted(pool, key=lambda x: -x[1])
    need = sum(size[item.adapter_id] for item, _, _ in kept)
    shed = []
    while kept and need > max_total_bytes:
        piece = kept.pop()
        need -= size[piece[0].adapter_id]
        shed.append(piece)
    return kept, shed


COLD_SHARE = 1 / 32  # an adapter under this share of a replica's room is cold: memory, not capacity, places it
STICKY_PASSES = 16   # spread_cold: passes that retry cold pieces on their previous replica after one did not fit


def spread_cold(bins, pieces, members, cls, level, size, previous) -> list[Piece]:
    """Cold pieces whole onto the member with the most free adapter memory that has the room (their previous
    replica first), so their bytes spread evenly and every replica keeps memory for copies of the hot adapters;
    returns the pieces that fit nowhere.

    Most adapters of a large fleet are cold, so this runs in numpy rounds (_spread_rounds); the pieces a round
    cannot place where it tried go through the exact one-piece-at-a-time pass (_spread_each), then to leftovers."""
    if not pieces or not members:
        return list(pieces)
    rest = _spread_rounds(bins, pieces, members, cls, level, size, previous)
    return _spread_each(bins, rest, members, cls, level, size, previous)


def _spread_rounds(bins, pieces, members, cls, level, size, previous) -> list[Piece]:
    """The bulk of spread_cold.
    (1) Each piece whose adapter had a previous replica among the members goes there (its largest previous share),
        in input order per replica, skipping those that do not fit: up to STICKY_PASSES passes of numpy prefix
        sums, each placing every replica's pieces up to its next miss, then dropping those that no longer fit alone.
    (2) The others in rounds, one piece each to the members whose memory used is within one piece of the least
        used, the k-th piece of a round onto the member with the k-th least (ties: lower index), as the
        one-at-a-time greedy does when the pieces are of one size.
    Every placement checks memory and the capacity at `level` with the crowding it adds, as Bins.fit; pieces that
    fail, and adapters already placed anywhere, are returned for the exact pass."""
    members_arr = np.asarray(members, dtype=np.int64)
    is_member = np.zeros(len(bins.load), dtype=bool)
    is_member[members_arr] = True
    fresh, rest, seen = [], [], set()
    for piece in pieces:   # an adapter already holding a piece somewhere (or twice here): the exact pass merges it
        adapter_id = piece[0].adapter_id
        (rest if adapter_id in bins.where or adapter_id in seen else fresh).append(piece)
        seen.add(adapter_id)
    if not fresh:
        return rest
    nbytes = np.array([size[p[0].adapter_id] for p in fresh], dtype=np.int64)
    amount = np.array([p[1] for p in fresh], dtype=np.float64)
    piece_cls = np.array([p[2] for p in fresh], dtype=np.int64)
    tol = EPS * np.array([p[0].tokens_per_s for p in fresh], dtype=np.float64)
    presence = bins.presences(amount)
    target = np.full(len(fresh), -1, dtype=np.int64)
    num_bins = len(is_member)
    for i, (item, _, _) in enumerate(fresh):
        old = [e for e in previous.get(item.adapter_id, ()) if e[0] < num_bins and is_member[e[0]]]
        if old:
            target[i] = max(old, key=lambda e: e[1])[0]
    sticky = np.flatnonzero(target >= 0)
    todo = np.flatnonzero(target < 0)
    pending = sticky[np.argsort(target[sticky], kind="stable")]   # by replica, input order within one
    # Staying put may fill a replica's adapter memory only to MEMORY_FILL: the rest is the room the hot adapters'
    # copies need there (the one-at-a-time greedy interleaves these with the spread, which leaves that room).
    sticky_bytes = int(MEMORY_FILL * bins.max_bytes)
    for _ in range(STICKY_PASSES):
        if not len(pending):
            break
        v = target[pending]
        fits = _fits_in_sequence(bins, v, nbytes[pending], amount[pending], presence[pending],
                                 np.maximum(piece_cls[pending], cls), tol[pending], level, sticky_bytes)
        bins.put_many(fresh, pending[fits], v[fits], nbytes, amount, piece_cls, presence)
        # A piece that does not fit its previous replica alone now cannot fit there later either (its load only
        # grows): spread it with the rest; the others try again, in sequence, in the next pass.
        pending = pending[~fits]
        alone = _fits_each(bins, target[pending], nbytes[pending], amount[pending], presence[pending],
                           np.maximum(piece_cls[pending], cls), tol[pending], level, sticky_bytes)
        todo = np.r_[todo, pending[~alone]]
        pending = pending[alone]
    todo = np.sort(np.r_[todo, pending])
    retry = []
    band = int(nbytes.max())   # a round serves the members within one piece of the least used, as the heap would
    lo = 0
    while lo < len(todo):
        mem = bins.mem[members_arr]
        order = np.lexsort((members_arr, mem))
        num = int(np.searchsorted(mem[order], mem[order[0]] + band, side="right"))   # >= 1
        chunk = todo[lo:lo + num]
        lo += len(chunk)
        by_memory = members_arr[order[:len(chunk)]]
        ok = _fits_each(bins, by_memory, nbytes[chunk], amount[chunk], presence[chunk],
                        np.maximum(piece_cls[chunk], cls), tol[chunk], level)
        bins.put_many(fresh, chunk[ok], by_memory[ok], nbytes, amount, piece_cls, presence)
        retry += [fresh[i] for i in chunk[~ok]]
    return rest + retry


def _fits_each(bins, v, nbytes, amount, presence, need_cls, tol, level, max_bytes=None) -> np.ndarray:
    """Bins.can_hold and Bins.fit(...) >= amount - tol of each piece alone on replica v (none holds the adapter);
    memory up to max_bytes (default the replicas')."""
    cap = bins.capacity(np.maximum(bins.cls[v], need_cls), bins.distinct[v] + presence)
    limit = bins.max_bytes if max_bytes is None else max_bytes
    return (bins.mem[v] + nbytes <= limit) & (level * cap - bins.load[v] >= amount - tol)


def _fits_in_sequence(bins, v, nbytes, amount, presence, need_cls, tol, level, max_bytes) -> np.ndarray:
    """Pieces grouped by replica v (input order within a group), each placed after the ones before it in its group:
    the mask of those placed, every group's prefix up to its first piece that does not fit."""
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    group = np.cumsum(np.r_[True, v[1:] != v[:-1]]) - 1

    def within(x: np.ndarray) -> np.ndarray:   # inclusive running sum within each group
        total = np.cumsum(x)
        return total - np.r_[0, total[starts[1:] - 1]][group]

    # a running max that restarts per group: offset each group by a multiple above every class
    big = int(need_cls.max()) + 1
    running_cls = np.maximum.accumulate(need_cls + group * big) - group * big
    mem_after = bins.mem[v] + within(nbytes)
    load_before = bins.load[v] + within(amount) - amount
    cap = bins.capacity(np.maximum(bins.cls[v], running_cls), bins.distinct[v] + within(presence))
    fits = (mem_after <= max_bytes) & (level * cap - load_before >= amount - tol)
    failed_before = within((~fits).astype(np.int64)) > 0   # a piece that failed, or one after it in its group
    return fits & ~failed_before


def _spread_each(bins, pieces, members, cls, level, size, previous) -> list[Piece]:
    """spread_cold one piece at a time (a heap of members by memory used): the exact greedy."""
    if not pieces:
        return []
    heap = [(int(bins.mem[v]), v) for v in members]
    heapq.heapify(heap)
    members_set, leftovers = set(members), []
    for item, amount, piece_cls in pieces:
        nbytes, tol = size[item.adapter_id], EPS * item.tokens_per_s
        target = None
        for v, _ in sorted(previous.get(item.adapter_id, ()), key=lambda e: -e[1]):
            if v in members_set and bins.can_hold(v, item.adapter_id, nbytes) and (
                    bins.fit(v, item.adapter_id, amount, max(cls, piece_cls), level) >= amount - tol):
                target = v
                break
        skipped = []
        while target is None and heap:
            used, v = heapq.heappop(heap)
            if used != bins.mem[v]:
                continue  # stale entry
            skipped.append((used, v))
            if bins.can_hold(v, item.adapter_id, nbytes) and (
                    bins.fit(v, item.adapter_id, amount, max(cls, piece_cls), level) >= amount - tol):
                target = v
        for entry in skipped:
            heapq.heappush(heap, entry)
        if target is None:
            leftovers.append((item, amount, piece_cls))
            continue
        bins.put(target, item, nbytes, amount, piece_cls)
        heapq.heappush(heap, (int(bins.mem[target]), target))
    return leftovers


def pack_class(bins, pieces, members, cls, level, size, min_share, previous) -> list[Piece]:
    """Pieces of one class's pool onto `members` (replicas of class `cls`), each up to `level` x its capacity:
    cold pieces spread by memory (spread_cold), then fractional LPT of the rest (hottest first, split where they
    do not fit whole), an adapter's previous replicas first (less churn); returns the pieces that did not fit."""
    if members:
        cold_below = COLD_SHARE * level * bins.cap_of_class[cls]
        cold = [p for p in pieces if p[0].tokens_per_s < cold_below]
        pieces = [p for p in pieces if p[0].tokens_per_s >= cold_below]
        leftovers = spread_cold(bins, cold, members, cls, level, size, previous)
    else:
        leftovers = []
    room = {v: bins.free(v, cls, level) for v in members}
    heap = [(-room[v], v) for v in members]
    heapq.heapify(heap)

    def place(v: int, item: AdapterLoad, nbytes: int, amount: float, piece_cls: int) -> None:
        bins.put(v, item, nbytes, amount, piece_cls)
        room[v] = bins.free(v, cls, level)
        heapq.heappush(heap, (-room[v], v))

    for item, total, piece_cls in pieces:
        remaining, last, nbytes = total, None, size[item.adapter_id]
        min_piece, tol = min_share * item.tokens_per_s, EPS * item.tokens_per_s
        old = previous.get(item.adapter_id, ())
        for v, p_old in sorted(old, key=lambda e: -e[1]):  # sticky: stay where it was if there is room
            if v in room and remaining > tol and bins.can_hold(v, item.adapter_id, nbytes):
                cap = item.tokens_per_s * p_old if len(old) > 1 else remaining
                amount = bins.fit(v, item.adapter_id, min(remaining, cap), max(cls, piece_cls), level)
                if amount >= min(min_piece, remaining) and amount > tol:
                    place(v, item, nbytes, amount, piece_cls)
                    remaining -= amount
                    last = v
        while remaining > tol:
            if (last is not None and remaining < min_piece
                    and bins.fit(last, item.adapter_id, remaining, max(cls, piece_cls), level) >= remaining - tol):
                place(last, item, nbytes, remaining, piece_cls)  # a crumb: keep it with the last piece
                break
            skipped, found = [], None
            while heap:
                neg_room, v = heapq.heappop(heap)
                if -neg_room != room[v]:
                    continue  # stale entry (a later placement changed the room)
                if bins.can_hold(v, item.adapter_id, nbytes):
                    found = v
                    break
                skipped.append((neg_room, v))
            for entry in skipped:
                heapq.heappush(heap, entry)
            free = 0.0
            if found is not None:
                heapq.heappush(heap, (-room[found], found))
                free = bins.fit(found, item.adapter_id, remaining, max(cls, piece_cls), level)
            if found is None or free <= tol or (free < min_piece and free < remaining):
                leftovers.append((item, remaining, piece_cls))
                break
            amount = free
            if remaining - amount >= remaining:  # below float resolution: take it all (terminates)
                amount = remaining
            place(found, item, nbytes, amount, piece_cls)
            remaining -= amount
            last = found
    return leftovers


def spill(bins, item, amount, cls, nbytes, min_share) -> float:
    """Step 4 for one leftover piece, without overloading: at rising fill levels (2% steps up to the operating
    point, so the overflow is spread evenly), replicas of its own class (or empty) first, then higher classes
    (closest first), then any replica (raising its class only where the load still fits); split across replicas
    when needed. Returns the tokens/s that fit nowhere under the operating points."""
    remaining, min_piece, tol = amount, min_share * item.tokens_per_s, EPS * item.tokens_per_s
    mem_ok = bins.memory_ok(item.adapter_id, nbytes)
    if not mem_ok.any():
        raise PlacementInfeasible(
            f"adapter '{item.adapter_id}' ({nbytes} bytes) fits in no replica's remaining adapter memory "
            f"({bins.max_bytes} bytes each); add replicas or adapter memory"
        )
    top = max(1.0, bins.fill)
    levels = [*np.arange(bins.fill, top, LEVEL_STEP).tolist(), top]
    phases = [((bins.cls == cls) | (bins.cls == 0)) & mem_ok, (bins.cls > cls) & mem_ok, mem_ok]
    for level in levels:
        for phase in phases:
            in_phase = phase.copy()  # replicas skipped below (own crowding) are tried again at the next level
            while remaining > tol:
                new_cls = np.maximum(bins.cls, cls)
                room = level * bins.capacity(new_cls) - bins.load
                ok = in_phase & (room > tol) & (room >= min(min_piece, remaining) - tol)
                if not ok.any():
                    break
                candidates = np.flatnonzero(ok)
                closest = candidates[new_cls[candidates] == new_cls[candidates].min()]
                v = int(closest[np.argmax(room[closest])])  # closest class (least capacity used), most room
                put = bins.fit(v, item.adapter_id, remaining, cls, level)  # with the crowding it adds
                if put < min(min_piece, remaining) - tol or put <= tol:
                    in_phase[v] = False  # its own crowding leaves no room for this piece at this level
                    continue
                if remaining - put >= remaining:  # a piece below float resolution: take it all (terminates)
                    put = remaining
                bins.put(v, item, nbytes, put, cls)
                remaining -= put
            if remaining <= tol:
                return 0.0
    return remaining


def overload(bins, item, amount, cls, nbytes) -> None:
    """Demand beyond every operating point: the replica with the lowest utilization after taking it."""
    mem_ok = bins.memory_ok(item.adapter_id, nbytes)
    new_cls = np.maximum(bins.cls, cls)
    after = (bins.load + amount) / bins.capacity(new_cls)
    after[~mem_ok] = np.inf
    bins.put(int(np.argmin(after)), item, nbytes, amount, cls)
