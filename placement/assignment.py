"""Maximum-weight perfect assignment (Hungarian method, shortest augmenting paths), numpy only."""

from __future__ import annotations

import numpy as np


def max_weight_assignment(weight: np.ndarray) -> np.ndarray:
    """perm [n] int64 with perm[row] = column, maximising Σ_row weight[row, perm[row]].

    weight: [n_rows, n_cols] float64 with n_rows <= n_cols (padded with zero rows to square internally).
    O(n^3) worst case; the inner loop over columns is vectorised, so n = 256 takes tens of milliseconds.
    """
    weight = np.asarray(weight, dtype=np.float64)
    num_rows, num_cols = weight.shape
    assert num_rows <= num_cols, "need n_rows <= n_cols"
    n = num_cols
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    square = np.zeros((n, n), dtype=np.float64)
    square[:num_rows] = weight
    cost = square.max() - square  # minimise a non-negative cost
    inf = np.inf
    # 1-based potentials as in the classic formulation; column 0 is the virtual start.
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    row_of_col = np.zeros(n + 1, dtype=np.int64)  # 0 = free column
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of_col[0] = i
        j0 = 0
        minv = np.full(n + 1, inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of_col[j0]
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            used_cols = np.flatnonzero(used)
            u[row_of_col[used_cols]] += delta
            v[used_cols] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if row_of_col[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            row_of_col[j0] = row_of_col[j1]
            j0 = j1
    perm = np.empty(n, dtype=np.int64)
    perm[row_of_col[1:] - 1] = np.arange(n)
    return perm[:num_rows]
