"""RoutingTableStore on a real Redis: publish/load, versions, compare-and-set, pub/sub, Redis down."""

from __future__ import annotations

import json
import threading
import time

import pytest

from lorafleet.infra.errors import PlacementConflict, StoreUnavailable
from lorafleet.placement import RoutingTable, RoutingTableStore

pytestmark = pytest.mark.timeout(300)  # a hang fails fast instead of stalling CI


def _table(version=0):
    return RoutingTable(3, {"a": ((0, 0.25), (2, 0.75)), "b": ((1, 1.0),)}, version=version)


def test_publish_load_and_versions(redis_prefix):
    client, prefix = redis_prefix
    store = RoutingTableStore(client, prefix)
    assert store.load() is None and store.version() == 0
    first = store.publish(_table())
    second = store.publish(_table(version=99))  # the stored counter decides, not the caller
    assert (first.version, second.version, store.version()) == (1, 2, 2)
    loaded = store.load()
    assert loaded.version == 2 and loaded.entries == _table().entries
    assert client.exists(f"{prefix}:routing_table") and client.exists(f"{prefix}:routing_table:version")


def test_compare_and_set_rejects_a_stale_writer(redis_prefix):
    client, prefix = redis_prefix
    store = RoutingTableStore(client, prefix)
    store.publish(_table())
    with pytest.raises(PlacementConflict, match="version 1, expected 0"):
        store.publish(_table(), expected_version=0)
    assert store.publish(_table(), expected_version=1).version == 2


def test_concurrent_publishers_get_distinct_versions(redis_prefix):
    import redis

    client, prefix = redis_prefix
    versions, lock = [], threading.Lock()

    def publish_many():
        own = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        store = RoutingTableStore(own, prefix)
        for _ in range(10):
            v = store.publish(_table()).version
            with lock:
                versions.append(v)
        own.close()

    threads = [threading.Thread(target=publish_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 41))
    assert RoutingTableStore(client, prefix).load().version == 40


def test_subscribers_hear_new_versions(redis_prefix):
    client, prefix = redis_prefix
    store = RoutingTableStore(client, prefix)
    pubsub = store.subscribe()
    store.publish(_table())
    deadline, message = time.monotonic() + 5.0, None
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)  # the first call may only consume the subscribe reply
    assert message is not None and json.loads(message["data"]) == {"version": 1}
    pubsub.close()


def test_adapter_info_round_trip(redis_prefix):
    client, prefix = redis_prefix
    store = RoutingTableStore(client, prefix)
    store.put_adapter_info("sql-r8", 8, 16 * 2**20)
    client.hset(store.adapters_key, "broken", "not json")
    assert store.adapter_info() == {"sql-r8": (8, 16 * 2**20)}


def test_redis_down_is_store_unavailable(down_redis):
    store = RoutingTableStore(down_redis, "lftest-down")
    for call in (store.load, store.version, lambda: store.publish(_table()), store.adapter_info):
        with pytest.raises(StoreUnavailable, match="Redis unreachable"):
            call()
