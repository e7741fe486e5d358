"""PlacementController without Ray: one period publishes a table over the live ranks; Redis down keeps the last."""

from __future__ import annotations

import time

from lf_testing import seed_demand, simulated_points_file

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
    settings = {"redis_prefix": prefix, "store_url": str(tmp_path / "store"), "rebalance_period_s": 30.0,
                "operating_points": simulated_points_file()}
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


def test_the_controller_places_with_the_capacities_the_replicas_measured(redis_prefix, tmp_path, caplog):
    """No operating_points file: nothing is solved until a replica published its measurement; then the table
    names the file it came from (replicas/profiler.py writes it, infra.capacity_store carries it)."""
    import json
    from pathlib import Path

    from lorafleet.infra.capacity_store import CapacityStore

    client, prefix = redis_prefix
    tables = seed_demand(client, prefix, 8, 3)
    settings = {"redis_prefix": prefix, "store_url": str(tmp_path / "store"), "rebalance_period_s": 30.0}
    controller = PlacementController(settings, num_replicas=2, start_loop=False)
    try:
        with caplog.at_level("WARNING", logger="lorafleet.placement"):
            assert controller.rebalance() is None
        assert "no operating points yet" in caplog.text and tables.load() is None
        measured = json.loads(Path(simulated_points_file()).read_text())
        measured["points"] = [{"rank": 8, "max_tokens_per_s": 900.0}, {"rank": 64, "max_tokens_per_s": 700.0}]
        CapacityStore(client, prefix).put("key-1", "/profiles/key-1.json", measured)
        report = controller.rebalance()
        assert report is not None and report["operating_points"] == "/profiles/key-1.json"
        table = tables.load()
        assert table.meta["operating_points"] == "/profiles/key-1.json"
        assert sum(row["tokens_per_s"] for row in report["replicas"]) > 0
    finally:
        controller.stop()
