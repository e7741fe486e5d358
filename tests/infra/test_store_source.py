"""Replica-side StoreSource: tiers (Redis → object store), single-flight, versions, events, hash checks, metrics."""

from __future__ import annotations

import threading
import time

import pytest
from lf_testing import wait_until

from lorafleet.infra.adapter_source import VersionedSource
from lorafleet.infra.errors import AdapterNotFound, InvalidAdapterId
from lorafleet.infra.object_store import LocalDirObjectStore
from lorafleet.infra.single_flight import SingleFlight
from lorafleet.infra.store_source import StoreSource
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


def test_tiers_object_store_then_redis(store, adapter_files):
    record = store.push("a", files=adapter_files["lora8"])
    with StoreSource(store) as first, StoreSource(store) as second:
        engine_side: VersionedSource = first  # what the engine's adapter cache is typed against
        assert isinstance(engine_side, VersionedSource)
        fetched = engine_side.fetch("a")
        assert fetched.files == adapter_files["lora8"] and fetched.version == "1" and fetched.digest == record.sha256
        assert second.fetch("a").files == adapter_files["lora8"]  # another replica: the hot blob in Redis
        assert first.fetch("a").files == adapter_files["lora8"]   # no host tier here: Redis again
        hits = (first.metrics.snapshot()["hits"], second.metrics.snapshot()["hits"])
    assert hits == ({"redis": 1, "object_store": 1}, {"redis": 1, "object_store": 0})
    snap = first.metrics.snapshot()
    num_bytes = sum(map(len, adapter_files["lora8"].values()))
    assert snap["bytes"] == {"redis": num_bytes, "object_store": num_bytes}
    assert snap["latency"]["object_store"]["p50_ms"] > 0


def test_single_flight_one_fetch_for_32_waiters(make_store, adapter_files, tmp_path):
    objects = CountingObjectStore(tmp_path / "slow", delay_s=0.2)
    store = make_store(objects, hot_cache_max_bytes=0)
    store.push("a", files=adapter_files["lora4"])
    objects.num_gets = 0
    barrier = threading.Barrier(32)
    results = []
    with StoreSource(store) as source:
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


def test_events_reach_the_subscriber_and_current_versions_answer_in_one_lookup(store, adapter_files):
    store.push("a", files=adapter_files["lora8"])
    store.push("b", files=adapter_files["lora4"])
    seen = []
    with StoreSource(store) as source:
        assert source.subscribe(seen.append).wait_live()
        assert source.current_versions(["a", "b", "never-pushed"]) == {"a": "1", "b": "1", "never-pushed": None}
        store.push("a", files=adapter_files["ia3"])
        fetched = source.fetch("a")   # no event needed to see the new version: every fetch asks the registry
        assert fetched.version == "2" and fetched.files == adapter_files["ia3"]
        store.remove("a")
        with pytest.raises(AdapterNotFound, match="removed"):
            source.fetch("a")
        assert source.current_versions(["a", "b"]) == {"a": None, "b": "1"}
        wait_until(lambda: len(seen) == 2, 5.0, period_s=0.01)
    assert [(e.kind, e.adapter_id, e.version) for e in seen] == [("updated", "a", 2), ("removed", "a", 2)]


def test_current_versions_rebuild_a_lost_registry_instead_of_reading_every_adapter_as_removed(
        store, adapter_files, redis_client):
    store.push("a", files=adapter_files["lora8"])
    for key in redis_client.scan_iter(f"{store.prefix}:adapters:*"):   # Redis lost its data (restart, flush)
        redis_client.delete(key)
    with StoreSource(store) as source:
        assert source.current_versions(["a"]) == {"a": "1"}
    assert store.recovery.num_recoveries == 1


def test_corrupt_hot_blob_is_dropped_and_refetched(store, adapter_files, redis_client):
    record = store.push("a", files=adapter_files["lora8"])
    with StoreSource(store) as warm:
        warm.fetch("a")  # fills the hot cache
    weights_sha = record.files[WEIGHTS][0]
    redis_client.set(store.hot.blob_prefix + weights_sha, b"\x00" * 100)  # bit rot / a bad writer
    with StoreSource(store) as source:
        assert source.fetch("a").files == adapter_files["lora8"]
        snap = source.metrics.snapshot()
    assert snap["num_hash_mismatches"] == 1 and snap["hits"]["object_store"] == 1
    assert store.hot.get_many([weights_sha])[weights_sha] == adapter_files["lora8"][WEIGHTS]  # repaired


def test_bad_and_unknown_ids(store):
    with StoreSource(store) as source:
        for bad in ("../a", "a" * 129, "\u0430"):
            with pytest.raises(InvalidAdapterId):
                source.fetch(bad)
        with pytest.raises(AdapterNotFound):
            source.fetch("never-pushed")
