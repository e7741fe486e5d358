"""Rank-aware solver (LoRAServe Algorithm 1): properties with hypothesis, determinism, churn, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lorafleet.infra.errors import InvalidPlacement, PlacementInfeasible
from lorafleet.placement import AdapterLoad, OperatingPoints, RoutingTable, solve
from lorafleet.placement.assignment import max_weight_assignment

pytestmark = pytest.mark.timeout(300)  # a hang fails fast instead of stalling CI

RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
POINTS = OperatingPoints(
    {8: 8000.0, 16: 7500.0, 32: 7000.0, 64: 6000.0, 128: 5000.0}, 1.0, 0.1,
    max_adapter_bytes=8 * 2**30, adapter_bytes_per_rank=2 * 2**20,
)
CAP_MIN = min(POINTS.points.values())

adapters_st = st.lists(
    st.tuples(st.sampled_from(RANKS), st.floats(min_value=0.0, max_value=4000.0)), min_size=1, max_size=60
).map(lambda xs: [AdapterLoad(f"a{i}", r, d) for i, (r, d) in enumerate(xs)])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_table(placement, adapters, num_replicas):
    table = placement.table
    assert table.num_replicas == num_replicas
    with_demand = {a.adapter_id for a in adapters if a.tokens_per_s > 0}
    assert set(table.entries) == with_demand  # every adapter with demand placed, no other
    for entry in table.entries.values():
        assert sum(p for _, p in entry) == pytest.approx(1.0, abs=1e-9)
        assert all(0 <= r < num_replicas and 0 < p <= 1 + 1e-12 for r, p in entry)
    again = RoutingTable.from_json(table.to_json())
    assert again.entries.keys() == table.entries.keys()


def _memory_per_replica(placement, adapters, num_replicas):
    size = {a.adapter_id: POINTS.adapter_bytes(a.rank) for a in adapters}
    used = [0] * num_replicas
    for adapter_id, entry in placement.table.entries.items():
        for replica, _ in entry:
            used[replica] += size[adapter_id]
    return used


@SETTINGS
@given(adapters_st, st.integers(min_value=1, max_value=16), st.integers(min_value=0, max_value=3))
def test_every_adapter_routable_and_probabilities_valid(adapters, num_replicas, seed):
    placement = solve(adapters, POINTS, num_replicas, seed=seed)
    _check_table(placement, adapters, num_replicas)
    loads = np.zeros(num_replicas)
    for a in adapters:
        for replica, p in placement.table.entries.get(a.adapter_id, ()):
            loads[replica] += p * a.tokens_per_s
    assert np.allclose(loads, placement.replica_tokens_per_s, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(adapters_st, st.integers(min_value=1, max_value=16))
def test_capacity_respected_when_demand_fits_even_at_the_highest_rank(adapters, num_replicas):
    total = sum(a.tokens_per_s for a in adapters)
    assume(total <= 0.95 * num_replicas * CAP_MIN)
    placement = solve(adapters, POINTS, num_replicas, min_share=0.0)
    assert max(placement.replica_utilization) <= 1.0 + 1e-6
    for replica, load in enumerate(placement.replica_tokens_per_s):
        if load > 0:
            assert load <= POINTS.capacity(placement.replica_max_rank[replica]) * (1 + 1e-6)


@SETTINGS
@given(adapters_st, st.integers(min_value=1, max_value=12), st.integers(min_value=1, max_value=40))
def test_memory_respected_or_infeasible(adapters, num_replicas, budget_units):
    budget = budget_units * 64 * 2**20  # 64 MiB steps: from tight (rank 128 = 256 MiB) to roomy
    try:
        placement = solve(adapters, POINTS, num_replicas, max_adapter_bytes=budget)
    except PlacementInfeasible as exc:
        assert "memory" in str(exc)
        return
    _check_table(placement, adapters, num_replicas)
    assert max(_memory_per_replica(placement, adapters, num_replicas)) <= budget
    assert max(placement.replica_adapter_bytes) <= budget


def test_ample_memory_is_never_infeasible():
    adapters = [AdapterLoad(f"a{i}", RANKS[i % 8], 100.0 + i) for i in range(200)]
    total = sum(POINTS.adapter_bytes(a.rank) for a in adapters)
    placement = solve(adapters, POINTS, 3, max_adapter_bytes=total)
    _check_table(placement, adapters, 3)


def test_adapter_larger_than_replica_memory_is_infeasible():
    with pytest.raises(PlacementInfeasible, match="a0"):
        solve([AdapterLoad("a0", 128, 10.0)], POINTS, 4, max_adapter_bytes=2**20)


@SETTINGS
@given(adapters_st, st.integers(min_value=1, max_value=16), st.integers(min_value=0, max_value=5))
def test_deterministic_for_a_seed(adapters, num_replicas, seed):
    first = solve(adapters, POINTS, num_replicas, seed=seed).table
    second = solve(list(adapters), POINTS, num_replicas, seed=seed).table
    assert first.entries == second.entries and first.meta == second.meta


def _overlap(old: RoutingTable, new: RoutingTable, demand: dict[str, float]) -> float:
    total = 0.0
    for adapter_id, entry in new.entries.items():
        previous = dict(old.entries.get(adapter_id, ()))
        total += demand[adapter_id] * sum(min(p, previous.get(r, 0.0)) for r, p in entry)
    return total


@SETTINGS
@given(adapters_st, st.integers(min_value=1, max_value=12), st.integers(min_value=0, max_value=10**6))
def test_permutation_churn_no_worse_than_identity_order(adapters, num_replicas, noise_seed):
    previous = solve(adapters, POINTS, num_replicas).table
    rng = np.random.default_rng(noise_seed)
    changed = [AdapterLoad(a.adapter_id, a.rank, a.tokens_per_s * rng.uniform(0.5, 1.5)) for a in adapters]
    placement = solve(changed, POINTS, num_replicas, previous=previous)
    inverse = {physical: virtual for virtual, physical in enumerate(placement.permutation)}
    identity = RoutingTable(
        num_replicas,
        {a: tuple(sorted((inverse[r], p) for r, p in e)) for a, e in placement.table.entries.items()},
    )
    demand = {a.adapter_id: a.tokens_per_s for a in changed}
    assert _overlap(previous, placement.table, demand) >= _overlap(previous, identity, demand) - 1e-6


def test_same_demand_again_moves_nothing():
    adapters = [AdapterLoad(f"a{i}", RANKS[i % 8], 5000.0 / (i + 1)) for i in range(300)]
    first = solve(adapters, POINTS, 8).table
    second = solve(adapters, POINTS, 8, previous=first).table
    assert second.entries == first.entries and second.version == first.version + 1


def test_ranks_are_isolated_when_budgets_allow():
    # Two classes, each exactly two replicas' worth at the balanced fill: no replica mixes them.
    adapters = [AdapterLoad(f"lo{i}", 8, 1000.0) for i in range(8)] + [
        AdapterLoad(f"hi{i}", 128, 625.0) for i in range(8)
    ]
    placement = solve(adapters, POINTS, 4)
    assert placement.class_budgets == {8: 2, 128: 2}
    for entry_id, entry in placement.table.entries.items():
        for replica, _ in entry:
            assert placement.replica_max_rank[replica] == (8 if entry_id.startswith("lo") else 128)
    assert placement.num_spilled == 0


def test_hot_adapter_is_split_across_replicas():
    adapters = [AdapterLoad("hot", 8, 3 * 8000.0 * 0.7), AdapterLoad("cold", 8, 100.0)]
    placement = solve(adapters, POINTS, 4)
    assert len(placement.table.entries["hot"]) >= 3


@pytest.mark.parametrize("bad", [0, -1])
def test_invalid_inputs(bad):
    with pytest.raises(InvalidPlacement):
        solve([AdapterLoad("a", 8, 1.0)], POINTS, bad)
    with pytest.raises(InvalidPlacement):
        AdapterLoad("a", 8, float("nan"))
    with pytest.raises(InvalidPlacement, match="twice"):
        solve([AdapterLoad("a", 8, 1.0), AdapterLoad("a", 16, 2.0)], POINTS, 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=6), st.integers(min_value=0, max_value=10**6))
def test_assignment_is_optimal_against_brute_force(n, seed):
    import itertools

    weight = np.random.default_rng(seed).random((n, n)).round(2)
    perm = max_weight_assignment(weight)
    best = max(sum(weight[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
    assert sorted(perm.tolist()) == list(range(n))
    assert sum(weight[i, perm[i]] for i in range(n)) == pytest.approx(best)


def test_solver_speed_10k_adapters_256_replicas():
    rng = np.random.default_rng(0)
    popularity = 1.0 / np.arange(1, 10_001) ** 1.1
    demand = popularity / popularity.sum() * 0.7 * 256 * 6000.0
    adapters = [AdapterLoad(f"a{i}", int(rng.choice(RANKS[3:])), float(d)) for i, d in enumerate(demand)]
    start = time.perf_counter()
    first = solve(adapters, POINTS, 256)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    solve(adapters, POINTS, 256, previous=first.table)
    warm = time.perf_counter() - start
    print(f"solve 10k x 256: {cold:.3f} s cold, {warm:.3f} s with a previous table")
    assert cold <= 2.0 and warm <= 2.0  # goal 1 s on the dev machine; slack for a loaded CI core
