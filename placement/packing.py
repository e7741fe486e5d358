"""Steps 3 and 4 of the solver: fractional bin packing per rank class, and the spill of leftovers."""

from __future__ import annotations

import heapq

import numpy as np

from lorafleet.infra.errors import PlacementInfeasible
from lorafleet.placement.bins import EPS, AdapterLoad
from lorafleet.placement.budgets import MEMORY_FILL
from lorafleet.placement.pool import Items, Piece, Pool

LEVEL_STEP = 0.02  # step 4 raises the fill level in 2% steps


COLD_SHARE = 1 / 32  # an adapter under this share of a replica's room is cold: memory, not capacity, places it
STICKY_PASSES = 16   # spread_cold: passes that retry cold pieces on their previous replica after one did not fit


def spread_cold(bins, pool: Pool, members, cls, level, items: Items, previous, previous_rows) -> list[Piece]:
    """Cold pieces whole onto the member with the most free adapter memory that has the room (their previous
    replica first), so their bytes spread evenly and every replica keeps memory for copies of the hot adapters;
    returns the pieces that fit nowhere.

    Most adapters of a large fleet are cold, so this runs in numpy rounds (_spread_rounds); the pieces a round
    cannot place where it tried go through the exact one-piece-at-a-time pass (_spread_each), then to leftovers.
    previous: the previous table's entries; previous_rows: its columns and each input position's row there (-1:
    none), or None."""
    if not len(pool) or not members:
        return items.tuples(pool)
    rest = _spread_rounds(bins, pool, members, cls, level, items, previous_rows)
    return _spread_each(bins, items.tuples(rest), members, cls, level, items, previous)


def _spread_rounds(bins, pool: Pool, members, cls, level, items: Items, previous_rows) -> Pool:
    """The bulk of spread_cold.
    (1) Each piece whose adapter had a previous replica among the members goes there (its largest previous share),
        in input order per replica, skipping those that do not fit: up to STICKY_PASSES passes of numpy prefix
        sums, each placing every replica's pieces up to its next miss, then dropping those that no longer fit alone.
    (2) The others in rounds, one piece each to the members whose memory used is within one piece of the least
        used, the k-th piece of a round onto the member with the k-th least (ties: lower index), as the
        one-at-a-time greedy does when the pieces are of one size.
    Every placement checks memory and the capacity at `level` with the crowding it adds, as Bins.fit; pieces that
    fail, and adapters already placed anywhere (or twice in the pool), are returned for the exact pass."""
    members_arr = np.asarray(members, dtype=np.int64)
    is_member = np.zeros(len(bins.load), dtype=bool)
    is_member[members_arr] = True
    # an adapter already holding a piece somewhere (or twice here): the exact pass merges it
    twice = np.bincount(pool.adapter)[pool.adapter] > 1 if len(pool) else np.zeros(0, dtype=bool)
    first = ~twice   # each adapter's first piece here (np.unique only over the few that repeat)
    repeated = np.flatnonzero(twice)
    first[repeated[np.unique(pool.adapter[repeated], return_index=True)[1]]] = True
    is_fresh = first & ~bins.is_placed(pool.adapter)
    rest, fresh = pool.take(np.flatnonzero(~is_fresh)), pool.take(np.flatnonzero(is_fresh))
    if not len(fresh):
        return rest
    nbytes = items.nbytes[fresh.adapter]
    amount, piece_cls = fresh.amount, fresh.cls
    tol = EPS * items.demand[fresh.adapter]
    presence = bins.presences(amount)
    target = _previous_replica(previous_rows, fresh.adapter, is_member)
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
        done = pending[fits]
        bins.put_many(fresh.adapter[done], v[fits], nbytes[done], amount[done], piece_cls[done], presence[done])
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
        done = chunk[ok]
        bins.put_many(fresh.adapter[done], by_memory[ok], nbytes[done], amount[done], piece_cls[done],
                      presence[done])
        retry.append(chunk[~ok])
    return rest + fresh.take(np.concatenate(retry) if retry else np.zeros(0, dtype=np.int64))


def _previous_replica(previous_rows, adapters: np.ndarray, is_member: np.ndarray) -> np.ndarray:
    """int64 [len(adapters)]: each adapter's replica of the largest probability in the previous table among the
    members (is_member, by replica), the lowest such replica on ties; -1 where it had none."""
    target = np.full(len(adapters), -1, dtype=np.int64)
    if previous_rows is None:
        return target
    columns, rows = previous_rows
    which, k = expand_rows(columns.offsets, rows[adapters])
    replica = columns.replicas[k]
    keep = replica < len(is_member)
    keep[keep] = is_member[replica[keep]]
    which, replica, probability = which[keep], replica[keep], columns.probabilities[k][keep]
    alone = np.bincount(which, minlength=len(adapters))[which] == 1   # most adapters: one previous replica
    target[which[alone]] = replica[alone]
    which, replica, probability = which[~alone], replica[~alone], probability[~alone]
    order = np.lexsort((replica, -probability, which))
    which, replica = which[order], replica[order]
    is_first = np.r_[True, which[1:] != which[:-1]] if len(which) else np.zeros(0, dtype=bool)
    target[which[is_first]] = replica[is_first]
    return target


def expand_rows(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which, k): for each i with rows[i] >= 0, i repeated once per piece of its row in a CSR table (offsets),
    and those pieces' indices k, row after row in the order of `rows`."""
    valid = np.flatnonzero(rows >= 0)
    starts, counts = offsets[rows[valid]], offsets[rows[valid] + 1] - offsets[rows[valid]]
    which = np.repeat(valid, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return which, np.repeat(starts, counts) + np.arange(len(which)) - first


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


def pack_class(bins, pool: Pool, members, cls, level, items: Items, min_share, previous, previous_rows) -> list[Piece]:
    """Pieces of one class's pool onto `members` (replicas of class `cls`), each up to `level` x its capacity:
    cold pieces spread by memory (spread_cold), then fractional LPT of the rest (hottest first, split where they
    do not fit whole), an adapter's previous replicas first (less churn); returns the pieces that did not fit."""
    if members:
        is_cold = items.demand[pool.adapter] < COLD_SHARE * level * bins.cap_of_class[cls]
        leftovers = spread_cold(bins, pool.take(np.flatnonzero(is_cold)), members, cls, level, items, previous,
                                previous_rows)
        pieces = items.tuples(pool.take(np.flatnonzero(~is_cold)))
    else:
        leftovers, pieces = [], items.tuples(pool)
    room = {v: bins.free(v, cls, level) for v in members}
    heap = [(-room[v], v) for v in members]
    heapq.heapify(heap)

    def place(v: int, item: AdapterLoad, nbytes: int, amount: float, piece_cls: int) -> None:
        bins.put(v, item, nbytes, amount, piece_cls)
        room[v] = bins.free(v, cls, level)
        heapq.heappush(heap, (-room[v], v))

    for item, total, piece_cls in pieces:
        remaining, last, nbytes = total, None, items[item.adapter_id]
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
    if remaining <= tol:
        return 0.0
    new_cls = np.maximum(bins.cls, cls)
    cap = bins.capacity(new_cls)   # kept up to date after each put, not recomputed per level and phase
    li = 0
    while li < len(levels):
        # skip the levels at which no replica of any phase has room (their loops below would place nothing): the same
        # room, level x cap - load, for every level left at once
        room = np.asarray(levels[li:])[:, None] * cap - bins.load
        threshold = min(min_piece, remaining) - tol
        has_room = ((room > tol) & (room >= threshold) & mem_ok).any(axis=1)
        if not has_room.any():
            break
        li += int(np.argmax(has_room))
        level = levels[li]
        li += 1
        for phase in phases:
            in_phase = phase.copy()  # replicas skipped below (own crowding) are tried again at the next level
            while remaining > tol:
                room = level * cap - bins.load
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
                new_cls[v] = max(int(bins.cls[v]), cls)   # only v's capacity changed: the same formula on it alone
                cap[v] = bins.capacity(new_cls[v:v + 1], bins.distinct[v:v + 1])[0]
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
