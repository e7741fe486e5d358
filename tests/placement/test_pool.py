"""The solver's array pieces (placement/pool.py) and array helpers against one-piece-at-a-time loop references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.placement import AdapterLoad, OperatingPoints
from lorafleet.placement.bins import EPS, Bins
from lorafleet.placement.packing import _previous_replica, expand_rows
from lorafleet.placement.pool import Items, Pool, carve, shed_memory
from lorafleet.placement.routing_table import RoutingTable
from lorafleet.placement.solver import _adapter_totals, _sort_by_demand, _tiebreak

pytestmark = pytest.mark.timeout(300)

SETTINGS = settings(max_examples=80, deadline=None)


def _pool(seed: int, num: int, num_adapters: int, ties: bool) -> tuple[Pool, np.ndarray, np.ndarray]:
    """(pool, demand [num_adapters], nbytes [num_adapters]); pieces may repeat an adapter."""
    rng = np.random.default_rng(seed)
    demand = rng.exponential(100.0, num_adapters)
    if ties:
        demand = np.round(demand, -1) + 1.0
    nbytes = rng.integers(1, 8, num_adapters).astype(np.int64) << 20
    adapter = rng.integers(0, num_adapters, num)
    amount = demand[adapter] * rng.choice([1.0, 0.5, 0.25], num)
    return Pool(adapter, amount, rng.choice([8, 16, 32], num).astype(np.int64)), demand, nbytes


def _as_list(pool: Pool) -> list[tuple[int, float, int]]:
    return list(zip(pool.adapter.tolist(), pool.amount.tolist(), pool.cls.tolist(), strict=True))


@SETTINGS
@given(seed=st.integers(0, 2**31), num=st.integers(0, 60), ties=st.booleans(), fraction=st.floats(-0.1, 1.1))
def test_shed_memory_matches_popping_the_coldest(seed, num, ties, fraction):
    pool, _, nbytes = _pool(seed, num, 20, ties)
    limit = fraction * float(nbytes[pool.adapter].sum())
    kept, shed = shed_memory(pool, limit, nbytes)
    ref = sorted(_as_list(pool), key=lambda x: -x[1])   # the loop: pop the coldest while the bytes do not fit
    need, ref_shed = sum(int(nbytes[a]) for a, _, _ in ref), []
    while ref and need > limit:
        piece = ref.pop()
        need -= int(nbytes[piece[0]])
        ref_shed.append(piece)
    assert _as_list(kept) == ref
    assert _as_list(shed) == ref_shed


@SETTINGS
@given(seed=st.integers(0, 2**31), num=st.integers(0, 60), ties=st.booleans(), fraction=st.floats(0.0, 1.2))
def test_carve_matches_splitting_the_hottest_one_by_one(seed, num, ties, fraction):
    pool, demand, _ = _pool(seed, num, 20, ties)
    excess = fraction * pool.total()
    kept, carved = carve(pool, excess, demand)
    ordered, ref_kept, ref_carved, i = sorted(_as_list(pool), key=lambda x: -x[1]), [], [], 0
    while i < len(ordered) and excess > 0:
        a, amount, c = ordered[i]
        take = min(amount, excess)
        if take > EPS * demand[a]:
            ref_carved.append((a, take, c))
            excess -= take
        if amount - take > EPS * demand[a]:
            ref_kept.append((a, amount - take, c))
        i += 1
    ref_kept = sorted(ref_kept + ordered[i:], key=lambda x: -x[1])
    assert _as_list(kept) == ref_kept
    assert _as_list(carved) == ref_carved


def test_pool_total_adds_left_to_right():
    pool = Pool(np.zeros(3, dtype=np.int64), np.array([1e16, 1.0, 1.0]), np.full(3, 8))
    total = 0
    for x in pool.amount.tolist():
        total += x
    assert pool.total() == total   # pairwise summation would give 1e16 + 2
    assert Pool.empty().total() == 0.0


@SETTINGS
@given(seed=st.integers(0, 2**31), num_rows=st.integers(0, 12), num=st.integers(0, 30))
def test_expand_rows_lists_each_rows_pieces_in_order(seed, num_rows, num):
    rng = np.random.default_rng(seed)
    offsets = np.r_[0, np.cumsum(rng.integers(1, 4, num_rows))].astype(np.int64)
    rows = rng.integers(-1, num_rows, num) if num_rows else np.full(num, -1)
    which, k = expand_rows(offsets, rows)
    ref = [(i, j) for i, r in enumerate(rows.tolist()) if r >= 0 for j in range(offsets[r], offsets[r + 1])]
    assert list(zip(which.tolist(), k.tolist(), strict=True)) == ref


@SETTINGS
@given(seed=st.integers(0, 2**31), num_adapters=st.integers(1, 30), num_replicas=st.integers(1, 8))
def test_previous_replica_is_the_largest_share_among_members(seed, num_adapters, num_replicas):
    rng = np.random.default_rng(seed)
    entries = {}
    for a in range(num_adapters):
        if rng.random() < 0.2:
            continue   # not in the previous table
        replicas = sorted(rng.choice(num_replicas + 2, int(rng.integers(1, 4)), replace=False).tolist())
        shares = rng.choice([1.0, 2.0, 3.0], len(replicas))   # ties on purpose
        entries[f"a{a}"] = tuple(zip(replicas, (shares / shares.sum()).tolist(), strict=True))
    table = RoutingTable(num_replicas + 2, entries)
    columns = table.columns()
    rows = columns.rows_of([f"a{a}" for a in range(num_adapters)])
    is_member = rng.random(num_replicas) < 0.6
    got = _previous_replica((columns, rows), np.arange(num_adapters), is_member)
    for a in range(num_adapters):
        old = [e for e in entries.get(f"a{a}", ()) if e[0] < num_replicas and is_member[e[0]]]
        assert got[a] == (max(old, key=lambda e: e[1])[0] if old else -1)
    assert (_previous_replica(None, np.arange(num_adapters), is_member) == -1).all()


@SETTINGS
@given(demand=st.lists(st.sampled_from([0.0, 1.0, 2.5, 7.0, 1e-300, 3e5]), min_size=0, max_size=40),
       seed=st.integers(0, 3))
def test_sort_by_demand_is_demand_descending_then_seeded_hash(demand, seed):
    ids = [f"x{i}" for i in range(len(demand))]
    values = np.array(demand, dtype=np.float64)
    positions = np.flatnonzero(values > 0)
    order = _sort_by_demand(positions, values, ids, seed)
    ref = sorted(positions.tolist(), key=lambda k: (-demand[k], _tiebreak(seed, ids[k])))
    assert order.tolist() == ref


@SETTINGS
@given(seed=st.integers(0, 2**31), num=st.integers(1, 40))
def test_adapter_totals_add_in_replica_order(seed, num):
    rng = np.random.default_rng(seed)
    row = rng.integers(0, 6, num)
    v = rng.permutation(num)   # distinct replicas per piece
    amount = rng.exponential(1.0, num) * 10.0 ** rng.integers(-8, 8, num)
    got = _adapter_totals(row, v, amount)
    for i in range(num):
        total = 0.0
        for j in sorted(np.flatnonzero(row == row[i]).tolist(), key=lambda j: v[j]):
            total += amount[j]
        assert got[i] == total


@SETTINGS
@given(seed=st.integers(0, 2**31), num=st.integers(1, 30))
def test_put_many_then_one_at_a_time_matches_put(seed, num):
    """Pieces put whole by put_many (Bins.home), then touched one at a time (fit, can_hold, put, memory_ok), read
    as pieces put one at a time from the start would."""
    points = OperatingPoints.default()
    rng = np.random.default_rng(seed)
    adapters = [AdapterLoad(f"a{i}", 8, float(rng.exponential(50.0))) for i in range(num)]
    position = {a.adapter_id: k for k, a in enumerate(adapters)}
    bulk = Bins(4, points, 64 << 20, 0.7, position, num)
    ref = Bins(4, points, 64 << 20, 0.7, position, num)
    v = rng.integers(0, 4, num)
    nbytes = np.full(num, 1 << 20, dtype=np.int64)
    amount = np.array([a.tokens_per_s for a in adapters])
    cls = np.full(num, 8, dtype=np.int64)
    bulk.put_many(np.arange(num), v, nbytes, amount, cls, bulk.presences(amount))
    for k, a in enumerate(adapters):
        ref.put(int(v[k]), a, 1 << 20, a.tokens_per_s, 8)
    assert bulk.is_placed(np.arange(num)).all()
    np.testing.assert_allclose(bulk.distinct, ref.distinct, rtol=1e-12)
    assert (bulk.mem == ref.mem).all() and (bulk.load == ref.load).all() and (bulk.cls == ref.cls).all()
    for k in rng.permutation(num)[: num // 2].tolist():   # one at a time on some of them
        a, r = adapters[k], int(rng.integers(0, 4))
        assert bulk.can_hold(r, a.adapter_id, 1 << 20) == ref.can_hold(r, a.adapter_id, 1 << 20)
        assert bulk.fit(r, a.adapter_id, 5.0, 8, 0.7) == pytest.approx(ref.fit(r, a.adapter_id, 5.0, 8, 0.7))
        assert (bulk.memory_ok(a.adapter_id, 1 << 20) == ref.memory_ok(a.adapter_id, 1 << 20)).all()
        bulk.put(r, a, 1 << 20, 5.0, 8)
        ref.put(r, a, 1 << 20, 5.0, 8)
    placed = {(int(p), int(r)): x for p, r, x in zip(*bulk.placed(), strict=True)}
    expected = {(position[a], r): x for r, pieces in enumerate(ref.pieces) for a, x in pieces.items()}
    assert placed.keys() == expected.keys()
    assert all(placed[key] == pytest.approx(expected[key]) for key in expected)
    assert (bulk.mem == ref.mem).all()


def test_items_map_ids_to_bytes_and_pools_to_pieces():
    adapters = [AdapterLoad("x", 8, 1.0), AdapterLoad("y", 16, 2.0)]
    items = Items(adapters, np.array([1.0, 2.0]), np.array([10, 20], dtype=np.int64))
    pool = Pool(np.array([1]), np.array([0.5]), np.array([16]))
    assert items.tuples(pool) == [(adapters[1], 0.5, 16)]
    assert items["y"] == 20 and items.position == {"y": 1}   # only the adapters handed out as tuples
    with pytest.raises(KeyError):
        items["x"]
    pool = Pool(np.array([1, 0]), np.array([0.5, 1.0]), np.array([16, 8]))
    assert items.tuples(pool) == [(adapters[1], 0.5, 16), (adapters[0], 1.0, 8)]
    assert _as_list(pool + Pool.empty()) == _as_list(pool)
    assert copy.copy(pool).take(np.array([1])).adapter.tolist() == [0]


def test_previous_entries_read_the_previous_table_by_input_position():
    from lorafleet.placement.pool import PreviousEntries

    table = RoutingTable(4, {"a": ((0, 0.25), (3, 0.75)), "b": ((2, 1.0),)})
    columns = table.columns()
    position = {"a": 1, "b": 0, "c": 2}   # input positions of the adapters handed out (Items.tuples)
    rows = columns.rows_of(["b", "a", "c"])
    previous = PreviousEntries(position, columns, rows)
    assert previous.get("a", ()) == table.entries["a"] and previous.get("b") == table.entries["b"]
    assert previous.get("c", ()) == () and previous.get("never-handed-out") is None
