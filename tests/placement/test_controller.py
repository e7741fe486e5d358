"""PlacementController without Ray: one period publishes a table over the live ranks; Redis down keeps the last."""

from __future__ import annotations

import time

from lf_testing import seed_demand

from lorafleet.infra.heartbeats import ReplicaLiveness
from lorafleet.placement.controller import PlacementController


def test_one_period_publishes_over_the_live_ranks(redis_prefix, tmp_path):
    client, prefix = redis_prefix
    tables = seed_demand(client, prefix, 8, 3)
    liveness = ReplicaLiveness(client, prefix)
    liveness.beat(0)
    liveness.beat(1, ttl_s=0.05)   # rank 1 beat once and stopped: dead
    liveness.beat(2)
    time.sleep(0.1)
    settings = {"redis_prefix": prefix, "store_url": str(tmp_path / "store"), "rebalance_period_s": 30.0}
    controller = PlacementController(settings, num_replicas=3, start_loop=False)
    try:
        assert controller.rebalance() is not None
        report = controller.last_report
        assert report["published"] and report["dead_replicas"] == [1] and report["num_adapters"] == 8
        table = tables.load()
        assert table.version == report["version"] and table.num_replicas == 3
        assert all(rank != 1 for entry in table.entries.values() for rank, _ in entry)
    finally:
        controller.stop()


def test_redis_down_skips_the_period_and_keeps_the_last_report(tmp_path, caplog):
    settings = {"redis_url": "redis://127.0.0.1:1/0", "redis_prefix": "lftest-down", "store_url": str(tmp_path)}
    controller = PlacementController(settings, num_replicas=2, start_loop=False)
    with caplog.at_level("WARNING", logger="lorafleet.placement"):
        assert controller.rebalance() is None
    assert "rebalance skipped" in caplog.text and "Redis" in caplog.text
