"""Placement over the live ranks only (a replica that died and stayed dead); beats: tests/infra/test_heartbeats.py."""

from __future__ import annotations

import pytest
from lf_testing import seed_demand

from lorafleet.placement import OperatingPoints
from lorafleet.placement.liveness import compact_previous
from lorafleet.placement.rebalancer import Rebalancer
from lorafleet.placement.routing_table import RoutingTable


def test_compact_previous_drops_dead_ranks_and_renormalises():
    previous = RoutingTable(4, {"a": ((0, 0.5), (1, 0.25), (3, 0.25)), "b": ((1, 1.0),), "c": ((3, 1.0),)}, version=7)
    compact = compact_previous(previous, [0, 3])
    assert compact.num_replicas == 2 and compact.version == 7
    assert dict(compact.entries["a"]) == pytest.approx({0: 2 / 3, 1: 1 / 3})
    assert "b" not in compact.entries and compact.entries["c"] == ((1, 1.0),)


def test_rebalance_over_live_ranks_places_nothing_on_a_dead_one(redis_prefix):
    client, prefix = redis_prefix
    tables = seed_demand(client, prefix, 16, 5)
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
