"""Replica-side StoreSource: tiers (host → Redis → object store), single-flight, events, hash checks, metrics."""

from __future__ import annotations

import threading
import time

import pytest
from lf_testing import wait_until

from lorafleet.infra.adapter_source import AdapterSource
from lorafleet.infra.errors import AdapterNotFound, InvalidAdapterId
from lorafleet.infra.host_cache import HostCache, HostEntry
from lorafleet.infra.object_store import LocalDirObjectStore
from lorafleet.infra.single_flight import SingleFlight
from lorafleet.infra.version_record import BUNDLE_FILES

CONFIG, WEIGHTS = BUNDLE_FILES


class CountingObjectStore(LocalDirObjectStore):
    """A local store that counts reads and makes them slow enough for fetchers to overlap."""

    def __init__(self, root, delay_s: float = 0.0) -> None:
        super().__init__(root)
        self.delay_s = delay_s
        self.num_gets = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        with self._lock:
            self.num_gets += 1
        time.sleep(self.delay_s)
        return super().get(key)


def test_tiers_object_store_then_host_then_redis(store, adapter_files):
    store.push("a", files=adapter_files["lora8"])
    with store.source() as first, store.source() as second:
        assert first.events.wait_live()
        engine_side: AdapterSource = first  # what the engine is typed against
        fetched = engine_side.fetch("a")
        assert fetched.files == adapter_files["lora8"] and fetched.version == "1"
        assert first.fetch("a").files == adapter_files["lora8"]
        assert second.fetch("a").files == adapter_files["lora8"]  # another replica: the hot blob in Redis
        hits = (first.metrics.snapshot()["hits"], second.metrics.snapshot()["hits"])
    assert hits == ({"host": 1, "redis": 0, "object_store": 1}, {"host": 0, "redis": 1, "object_store": 0})
    snap = first.metrics.snapshot()
    num_bytes = sum(map(len, adapter_files["lora8"].values()))
    assert snap["bytes"] == {"host": num_bytes, "redis": 0, "object_store": num_bytes}
    assert snap["latency"]["object_store"]["p50_ms"] > 0


def test_single_flight_one_fetch_for_32_waiters(make_store, adapter_files, tmp_path):
    objects = CountingObjectStore(tmp_path / "slow", delay_s=0.2)
    store = make_store(objects, hot_cache_max_bytes=0)
    store.push("a", files=adapter_files["lora4"])
    objects.num_gets = 0
    barrier = threading.Barrier(32)
    results = []
    with store.source(subscribe=False) as source:
        def fetch() -> None:
            barrier.wait()
            results.append(source.fetch("a"))

        threads = [threading.Thread(target=fetch) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 32 and all(r.files == adapter_files["lora4"] for r in results)
    assert objects.num_gets == 2  # one read per file, whatever the number of waiters
    snap = source.metrics.snapshot()
    assert snap["num_coalesced"] == 31 and snap["hits"]["object_store"] == 1


def test_single_flight_shares_errors():
    flights = SingleFlight()
    started, release = threading.Event(), threading.Event()
    errors = []

    def slow_failure():
        started.set()
        release.wait()
        raise AdapterNotFound("nope")

    def waiter():
        try:
            flights.do("k", lambda: pytest.fail("second execution"))
        except AdapterNotFound as exc:
            errors.append(exc)

    leader = threading.Thread(target=lambda: pytest.raises(AdapterNotFound, flights.do, "k", slow_failure))
    leader.start()
    started.wait()
    followers = [threading.Thread(target=waiter) for _ in range(3)]
    for t in followers:
        t.start()
    wait_until(lambda: flights._calls["k"].num_waiters == 3, 5.0, period_s=0.01)
    release.set()
    for t in [leader, *followers]:
        t.join()
    assert len(errors) == 3 and flights.num_in_flight() == 0
    assert flights.do("k", lambda: 7) == (7, False)


def test_update_event_drops_stale_host_copy(store, adapter_files):
    store.push("a", files=adapter_files["lora8"])
    seen = []
    with store.source() as source:
        source.add_listener(seen.append)
        assert source.events.wait_live()
        source.fetch("a")
        source.fetch("a")
        assert source.metrics.snapshot()["hits"]["host"] == 1
        store.push("a", files=adapter_files["ia3"])
        wait_until(lambda: "a" not in source.host, 5.0, period_s=0.01)
        fetched = source.fetch("a")
        assert fetched.version == "2" and fetched.files == adapter_files["ia3"]
        store.remove("a")
        wait_until(lambda: "a" not in source.host, 5.0, period_s=0.01)
        with pytest.raises(AdapterNotFound, match="removed"):
            source.fetch("a")
        wait_until(lambda: len(seen) == 2, 5.0, period_s=0.01)
    assert [(e.kind, e.version) for e in seen] == [("updated", 2), ("removed", 2)]


def test_without_events_every_fetch_checks_the_registry(store, adapter_files):
    store.push("a", files=adapter_files["lora8"])
    with store.source(subscribe=False) as source:
        assert source.fetch("a").version == "1"
        store.push("a", files=adapter_files["lora4"])
        assert source.fetch("a").files == adapter_files["lora4"]  # no event needed to see the new version


def test_corrupt_hot_blob_is_dropped_and_refetched(store, adapter_files, redis_client):
    record = store.push("a", files=adapter_files["lora8"])
    with store.source(subscribe=False) as warm:
        warm.fetch("a")  # fills the hot cache
    weights_sha = record.files[WEIGHTS][0]
    redis_client.set(store.hot.blob_prefix + weights_sha, b"\x00" * 100)  # bit rot / a bad writer
    with store.source(subscribe=False) as source:
        assert source.fetch("a").files == adapter_files["lora8"]
        snap = source.metrics.snapshot()
    assert snap["num_hash_mismatches"] == 1 and snap["hits"]["object_store"] == 1
    assert store.hot.get_many([weights_sha])[weights_sha] == adapter_files["lora8"][WEIGHTS]  # repaired


def test_host_cache_budget_and_bad_ids(store, adapter_files):
    for name in ("lora8", "lora4", "ia3"):
        store.push(name, files=adapter_files[name])
    sizes = {name: sum(map(len, adapter_files[name].values())) for name in ("lora8", "lora4", "ia3")}
    with store.source(host_cache_max_bytes=sizes["lora8"] + sizes["ia3"], subscribe=False) as source:
        for name in ("lora8", "lora4", "ia3"):
            source.fetch(name)
        assert "lora8" not in source.host and "ia3" in source.host
        assert source.host.num_bytes <= source.host.max_bytes
        for bad in ("../a", "a" * 129, "\u0430"):
            with pytest.raises(InvalidAdapterId):
                source.fetch(bad)
        with pytest.raises(AdapterNotFound):
            source.fetch("never-pushed")


def test_host_cache_lru_unit(store, adapter_files):
    record = store.push("a", files=adapter_files["ia3"])
    cache = HostCache(max_bytes=2 * record.num_bytes)
    for key in ("x", "y"):
        assert cache.put(key, HostEntry(record, adapter_files["ia3"]))
    cache.get("x")
    cache.put("z", HostEntry(record, adapter_files["ia3"]))
    assert "y" not in cache and "x" in cache and cache.num_bytes == 2 * record.num_bytes
    assert not HostCache(max_bytes=10).put("big", HostEntry(record, adapter_files["ia3"]))
