"""Maximum-weight assignments of the solver's step 5: replicas to replicas (sparse Hungarian method) and replicas
to rank classes with a budget per class (successive shortest paths over the classes). Pure Python + numpy."""

from __future__ import annotations

import heapq
import math

import numpy as np


def max_weight_assignment(weight: np.ndarray) -> np.ndarray:
    """perm [n_rows] int64 with perm[row] = column (distinct), maximising Σ_row weight[row, perm[row]].

    weight: [n_rows, n_cols] float64 >= 0 with n_rows <= n_cols. Only the non-zero entries are edges
    (`sparse_max_weight_assignment`), so a nearly diagonal matrix of 4096 replicas takes milliseconds.
    """
    weight = np.asarray(weight, dtype=np.float64)
    num_rows, num_cols = weight.shape
    assert num_rows <= num_cols, "need n_rows <= n_cols"
    rows, cols = np.nonzero(weight > 0)
    return sparse_max_weight_assignment(num_rows, num_cols, rows, cols, weight[rows, cols])


def sparse_max_weight_assignment(num_rows: int, num_cols: int, rows: np.ndarray, cols: np.ndarray,
                                 weights: np.ndarray) -> np.ndarray:
    """perm [num_rows] int64, distinct columns, maximising Σ weight over the listed edges (row, col, weight > 0);
    every pair not listed weighs 0 (num_rows <= num_cols).

    Successive shortest augmenting paths (Hungarian method, Dijkstra with row/column potentials) on the listed
    edges plus one private zero-weight column per row, so a row may stay "unmatched"; rows left unmatched then
    take the free columns, their own index first. Exact: a max-weight matching of the positive edges completed
    with zero-weight pairs is a max-weight perfect assignment. Rows are augmented hottest edge first.
    """
    assert num_rows <= num_cols, "need n_rows <= n_cols"
    rows = np.asarray(rows, dtype=np.int64)
    order = np.lexsort((-np.asarray(weights, dtype=np.float64), rows))
    rows, cols = rows[order], np.asarray(cols, dtype=np.int64)[order]
    costs = -np.asarray(weights, dtype=np.float64)[order]
    starts = np.searchsorted(rows, np.arange(num_rows + 1)).tolist()
    adj_cols, adj_costs = cols.tolist(), costs.tolist()
    # potentials: u (rows), v (columns; column num_cols + i is row i's private column, cost 0). Lists indexed by
    # column rather than dicts, and dist / settled reset after each search: the same arithmetic, ~2x faster.
    u = [min(0.0, adj_costs[starts[i]]) if starts[i] < starts[i + 1] else 0.0 for i in range(num_rows)]
    size = num_cols + num_rows
    v = [0.0] * size
    dist = [math.inf] * size
    settled = [False] * size
    row_of_col = [-1] * size
    col_of_row = [-1] * num_rows
    heappush, heappop = heapq.heappush, heapq.heappop
    for s in range(num_rows):
        if starts[s] == starts[s + 1]:
            continue  # no positive edge: it takes a free column at the end
        via: dict[int, int] = {}  # column -> row it was reached from
        done_rows = {s: 0.0}
        done_cols: dict[int, float] = {}  # settled column -> its distance
        heap: list[tuple[float, int]] = []

        def relax(i: int, base: float) -> None:
            ui = u[i]
            lo, hi = starts[i], starts[i + 1]
            for j, cost in zip(adj_cols[lo:hi], adj_costs[lo:hi]):
                if settled[j]:  # settled: float noise must not re-open it (a cycle in `via` never ends)
                    continue
                d = base + cost - ui - v[j]
                if d < dist[j]:
                    dist[j], via[j] = d, i
                    heappush(heap, (d, j))
            j = num_cols + i  # the row's private column
            if settled[j]:
                return
            d = base - ui - v[j]
            if d < dist[j]:
                dist[j], via[j] = d, i
                heappush(heap, (d, j))

        relax(s, 0.0)
        while True:
            d, j = heappop(heap)
            if d > dist[j] or settled[j]:
                continue
            done_cols[j] = d
            settled[j] = True
            i = row_of_col[j]
            if i < 0:
                break
            done_rows[i] = d
            relax(i, d)
        # potentials of the nodes settled before the free column j (reduced costs stay >= 0, the path tight)
        for c, dc in done_cols.items():
            v[c] -= d - dc
            settled[c] = False
        for i, di in done_rows.items():
            u[i] += d - di
        for c in via:
            dist[c] = math.inf
        while True:  # flip the path back to s
            i = via[j]
            prev = col_of_row[i]
            row_of_col[j], col_of_row[i] = i, j
            if i == s:
                break
            j = prev
    perm = np.full(num_rows, -1, dtype=np.int64)
    used = np.zeros(num_cols, dtype=bool)
    for i, j in enumerate(col_of_row):
        if 0 <= j < num_cols:
            perm[i], used[j] = j, True
    missing = np.flatnonzero(perm < 0)
    own = missing[missing < num_cols]
    keep_own = own[~used[own]]
    perm[keep_own], used[keep_own] = keep_own, True
    missing = np.flatnonzero(perm < 0)
    perm[missing] = np.flatnonzero(~used)[: len(missing)]
    return perm


def class_assignment(score: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """owner [R] int64: the class (row of `score`) of each replica, class k getting exactly budget[k] replicas,
    maximising Σ_p score[owner[p], p]. score: [K, R] float64; budget: [K] int64 summing to R.

    Every replica first takes its best class; then replicas move from classes above their budget to classes
    below it along shortest paths of the class graph (edge a -> b: the replica of a that loses least by moving
    to b; Bellman-Ford over the K classes, whose edges may be negative after earlier moves). Successive shortest
    paths from an optimal start: the result is optimal. O(moves x K x R) with K, the classes, small.
    """
    score = np.asarray(score, dtype=np.float64)
    num_classes, num_replicas = score.shape
    budget = np.asarray(budget, dtype=np.int64)
    assert budget.sum() == num_replicas and (budget >= 0).all(), "budgets must be >= 0 and sum to R"
    owner = np.argmax(score, axis=0).astype(np.int64)
    count = np.bincount(owner, minlength=num_classes)
    for _ in range(num_replicas + 1):
        surplus = count > budget
        if not surplus.any():
            return owner
        # edge (a, b): cheapest replica of a to hand to b (the first on ties), every class at once: the replicas
        # grouped by class (ascending within one), per-group minima and first minimal positions by reduceat
        edge_cost = np.full((num_classes, num_classes), np.inf)
        edge_replica = np.full((num_classes, num_classes), -1, dtype=np.int64)
        order = np.argsort(owner, kind="stable")
        size = np.bincount(owner, minlength=num_classes)
        held = np.flatnonzero(size)
        starts = (np.cumsum(size) - size)[held]
        loss = (score[owner, np.arange(num_replicas)][None, :] - score)[:, order]  # [K, R]: to b, by class
        cheapest = np.minimum.reduceat(loss, starts, axis=1)  # [K (b), classes held (a)]
        at = np.where(loss == np.repeat(cheapest, size[held], axis=1), np.arange(num_replicas), num_replicas)
        edge_cost[held] = cheapest.T
        edge_replica[held] = order[np.minimum.reduceat(at, starts, axis=1)].T
        edge_cost[held, held] = np.inf
        dist = np.where(surplus, 0.0, np.inf)
        parent = np.full(num_classes, -1, dtype=np.int64)
        for _ in range(num_classes):
            through = dist[:, None] + edge_cost  # [a, b]
            src = np.argmin(through, axis=0)
            better = through[src, np.arange(num_classes)] < dist - 1e-12
            if not better.any():
                break
            dist[better] = through[src, np.arange(num_classes)][better]
            parent[better] = src[better]
        deficit = np.flatnonzero(count < budget)
        target = int(deficit[np.argmin(dist[deficit])])
        node, moves = target, []
        while parent[node] >= 0 and len(moves) < num_classes:
            a = int(parent[node])
            moves.append((int(edge_replica[a, node]), node))
            node = a
        for p, b in moves:
            owner[p] = b
        count[node] -= 1
        count[target] += 1
    return owner
