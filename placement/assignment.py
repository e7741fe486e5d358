"""Maximum-weight assignments of the solver's step 5: replicas to replicas (SciPy's sparse LAPJV) and replicas to rank
classes with a budget per class (successive shortest paths over the classes, Python + numpy)."""

from __future__ import annotations

import numpy as np


def sparse_max_weight_assignment(num_rows: int, num_cols: int, rows: np.ndarray, cols: np.ndarray,
                                 weights: np.ndarray) -> np.ndarray:
    """perm [num_rows] int64, distinct columns, maximising Σ weight over the listed edges (row, col, weight > 0;
    an edge listed twice weighs the sum); every pair not listed weighs 0 (num_rows <= num_cols).

    SciPy's sparse LAPJV (`min_weight_full_bipartite_matching`, maximize=True) on the listed edges plus one private
    column per row, so a row may stay "unmatched"; rows left unmatched then take the free columns, their own index
    first. Exact: a max-weight matching of the positive edges completed with zero-weight pairs is a max-weight
    perfect assignment. Every edge, the private columns' included, is shifted by the same positive epsilon (LAPJV
    takes a stored zero for a missing edge); each row takes exactly one column, so the shift changes no optimum.
    """
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    assert num_rows <= num_cols, "need n_rows <= n_cols"
    weights = np.asarray(weights, dtype=np.float64)
    positive = weights > 0
    perm = np.full(num_rows, -1, dtype=np.int64)
    used = np.zeros(num_cols, dtype=bool)
    if positive.any():
        own = np.arange(num_rows)
        graph = coo_array((np.concatenate([weights[positive], np.zeros(num_rows)]),
                           (np.concatenate([np.asarray(rows)[positive], own]),
                            np.concatenate([np.asarray(cols)[positive], num_cols + own]))),
                          shape=(num_rows, num_cols + num_rows)).tocsr()   # sums an edge's entries
        graph.data += graph.data[graph.data > 0].min() / 2
        matched_rows, matched_cols = min_weight_full_bipartite_matching(graph, maximize=True)
        real = matched_cols < num_cols
        perm[matched_rows[real]] = matched_cols[real]
        used[matched_cols[real]] = True
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
