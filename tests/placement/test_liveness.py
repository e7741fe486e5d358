"""Replica heartbeats in Redis and placement over the live ranks only (a replica that died and stayed dead)."""

from __future__ import annotations

import time

import pytest

from lorafleet.infra.demand import DemandCounters
from lorafleet.infra.errors import StoreUnavailable
from lorafleet.placement import OperatingPoints, RoutingTableStore
from lorafleet.placement.liveness import ReplicaLiveness, compact_previous, start_heartbeat
from lorafleet.placement.rebalancer import Rebalancer
from lorafleet.placement.routing_table import RoutingTable


def test_live_ranks_follow_heartbeats_and_their_ttl(redis_prefix):
    client, prefix = redis_prefix
    liveness = ReplicaLiveness(client, prefix)
    assert liveness.live_ranks(4) is None   # nobody beats: unknown, not "all dead"
    liveness.beat(2, {"queue_len": 3})
    liveness.beat(0, ttl_s=0.2)
    assert liveness.live_ranks(4) is None   # none known dead (ranks 1 and 3 never beat: still starting)
    time.sleep(0.35)
    assert liveness.live_ranks(4) == [1, 2, 3]   # rank 0 beat, then stopped: dead after its TTL
    assert liveness.live_ranks(1) is None   # every asked rank silent: unknown, not "all dead"
    liveness.beat(0)
    assert liveness.live_ranks(4) is None   # back


def test_heartbeat_thread_beats_until_stopped(redis_prefix):
    client, prefix = redis_prefix
    liveness = ReplicaLiveness(client, prefix)
    rank: list[int | None] = [None]
    stop = start_heartbeat(liveness, lambda: rank[0], lambda: {"queue_len": 0}, period_s=0.05)
    try:
        time.sleep(0.2)
        assert not client.exists(f"{prefix}:replicas:seen")   # no rank yet: nothing written
        rank[0] = 1
        deadline = time.monotonic() + 5
        while not client.exists(f"{prefix}:replicas:live:1"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.smembers(f"{prefix}:replicas:seen") == {b"1"}
    finally:
        stop.set()


def test_redis_down_is_one_store_unavailable(down_redis):
    with pytest.raises(StoreUnavailable, match="replica heartbeats: Redis unreachable"):
        ReplicaLiveness(down_redis, "x").live_ranks(3)


def test_compact_previous_drops_dead_ranks_and_renormalises():
    previous = RoutingTable(4, {"a": ((0, 0.5), (1, 0.25), (3, 0.25)), "b": ((1, 1.0),), "c": ((3, 1.0),)}, version=7)
    compact = compact_previous(previous, [0, 3])
    assert compact.num_replicas == 2 and compact.version == 7
    assert dict(compact.entries["a"]) == pytest.approx({0: 2 / 3, 1: 1 / 3})
    assert "b" not in compact.entries and compact.entries["c"] == ((1, 1.0),)


def test_rebalance_over_live_ranks_places_nothing_on_a_dead_one(redis_prefix):
    client, prefix = redis_prefix
    counters, tables = DemandCounters(client, prefix), RoutingTableStore(client, prefix)
    now = time.time()
    for i in range(16):
        tables.put_adapter_info(f"ad-{i}", (8, 64)[i % 2], 0)
        for k in range(5):
            counters.record(f"ad-{i}", 40_000 // (i + 1), 10, now=now - 30 * k)
    rebalancer = Rebalancer(client, prefix, OperatingPoints.default(), 30.0, 128)
    full, _ = rebalancer.run(4)
    before = tables.load()
    assert full["dead_replicas"] == [] and {r for e in before.entries.values() for r, _ in e} == {0, 1, 2, 3}

    report, _ = rebalancer.run(4, live_ranks=[0, 1, 3])   # rank 2 died and was not replaced
    table = tables.load()
    assert report["dead_replicas"] == [2] and table.num_replicas == 4 and table.version == before.version + 1
    assert set(table.entries) == set(before.entries)   # every adapter still placed
    for entry in table.entries.values():
        assert all(rank != 2 for rank, _ in entry) and sum(p for _, p in entry) == pytest.approx(1.0)
    rows = {row["replica"]: row for row in report["replicas"]}
    assert rows[2]["num_adapters"] == 0 and rows[2]["tokens_per_s"] == 0
    assert table.meta["live_ranks"] == [0, 1, 3] and table.meta["replica_tokens_per_s"][2] == 0
    # The dead rank's traffic had to move; the live ranks' traffic mostly stays put (no full reshuffle).
    assert 0 < report["diff"]["churn"] < 0.75, report["diff"]["churn"]

    with pytest.raises(Exception, match="live ranks"):
        rebalancer.run(4, live_ranks=[0, 4])
