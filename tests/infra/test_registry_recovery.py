"""Automatic registry recovery on real Redis: a registry Redis lost (keys deleted, or a redis-server restarted
empty) is rebuilt from the object store at the next miss, once, without anyone running reindex."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
from lf_testing import delete_prefix

from lorafleet.infra import registry_recovery
from lorafleet.infra.errors import AdapterNotFound, StoreUnavailable
from lorafleet.infra.object_store import LocalDirObjectStore, ObjectStore
from lorafleet.infra.redis_conn import connect
from lorafleet.infra.registry import Registry, RegistryLost
from lorafleet.infra.store import AdapterStore
from lorafleet.infra.store_source import StoreSource
from lorafleet.infra.version_record import BUNDLE_FILES, VersionRecord

CONFIG, WEIGHTS = BUNDLE_FILES


class CountingObjects(ObjectStore):
    """A real object store that counts the calls made to it; `on_put(key)` runs before each write."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: Counter[str] = Counter()
        self.on_put = None

    def get(self, key: str) -> bytes:
        self.calls["get"] += 1
        return self.inner.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.calls["put"] += 1
        if self.on_put is not None:
            self.on_put(key)
        self.inner.put(key, data)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str) -> list[str]:
        self.calls["list " + prefix] += 1
        return self.inner.list(prefix)


@pytest.fixture
def objects(tmp_path):
    return CountingObjects(LocalDirObjectStore(tmp_path / "objects"))


@pytest.fixture
def fast_checks(monkeypatch):
    """No rate limit: every miss checks the marker (shows that the marker, not the clock, spares the store)."""
    monkeypatch.setattr(registry_recovery, "CHECK_INTERVAL_S", 0.0)


def count_marker_checks(store: AdapterStore) -> Counter:
    calls: Counter[str] = Counter()
    check = store.registry.marker_state

    def counted() -> str:
        calls["marker"] += 1
        return check()

    store.registry.marker_state = counted
    return calls


def manifest_lists(objects: CountingObjects) -> int:
    return objects.calls["list manifests/"]


def test_keys_deleted_current_recovers_by_itself(make_store, objects, adapter_files, redis_client, prefix):
    pusher = make_store(objects)
    pusher.push("a", files=adapter_files["lora8"])
    pusher.push("a", files=adapter_files["lora4"])
    pusher.push("b", files=adapter_files["ia3"])
    registry = pusher.registry
    assert json.loads(redis_client.get(registry.marker_key))["by"] == "empty object store"  # the first push's check
    delete_prefix(redis_client, prefix)  # what a Redis restarted without persistence holds under the prefix
    objects.calls.clear()

    router = make_store(objects)  # another process: its first miss checks the marker
    record = router.current("a")
    assert record.version == 2 and record.files == pusher.versions("a")[1].files
    assert router.recovery.num_recoveries == 1 and manifest_lists(objects) == 1
    assert json.loads(redis_client.get(registry.marker_key))["by"] == "reindex"
    assert not redis_client.exists(registry.lock_key)  # released
    assert 0 < redis_client.pttl(registry.rebuilt_key) <= registry_recovery.REBUILT_S * 1000
    assert [r.adapter_id for r in router.list_current()] == ["a", "b"]
    assert router.get("b").files == adapter_files["ia3"]

    # The pushing process made no call while the keys vanished: it notices within CHECK_INTERVAL_S.
    delete_prefix(redis_client, prefix)
    start = time.monotonic()
    while True:
        try:
            assert pusher.current("b").version == 1
            break
        except AdapterNotFound:
            assert time.monotonic() - start < registry_recovery.CHECK_INTERVAL_S + 0.5
            time.sleep(0.05)
    assert pusher.recovery.num_recoveries == 1 and manifest_lists(objects) == 2


def test_redis_restarted_empty_recovers_current_list_and_replica(throwaway_redis, base_spec, objects, adapter_files):
    def open_store() -> AdapterStore:
        return AdapterStore(objects, connect(throwaway_redis.url, 1.0), "t", base=base_spec)

    pusher, router, replica = open_store(), open_store(), open_store()
    pusher.push("a", files=adapter_files["lora8"])
    pusher.push("a", files=adapter_files["lora4"])
    pusher.push("b", files=adapter_files["ia3"])
    pusher.push("gone", files=adapter_files["flora2"])
    pusher.remove("gone")
    with StoreSource(replica) as source:
        assert source.subscribe(lambda event: None).wait_live()   # a replica listening to registry events
        assert source.fetch("a").version == "2"
        throwaway_redis.stop()
        with pytest.raises(StoreUnavailable):
            router.current("a")
        throwaway_redis.start()  # same port, empty

        assert router.current("a").version == 2  # recovered at once: this process saw the outage
        assert [r.adapter_id for r in router.list_current()] == ["a", "b"]
        with pytest.raises(AdapterNotFound, match="'gone' was removed"):
            router.current("gone")
        assert router.recovery.num_recoveries == 1
        fetched = source.fetch("b")  # the replica resolves through the rebuilt registry
        assert fetched.version == "1" and fetched.files == adapter_files["ia3"]
        assert source.fetch("a").files == adapter_files["lora4"]
        assert replica.recovery.num_recoveries == 0  # rebuilt once, by the router
        assert pusher.push("a", files=adapter_files["flora2"]).version == 3
        deadline = time.monotonic() + 5
        while source.fetch("a").version != "3":  # the push's event reaches the replica
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert source.fetch("a").files == adapter_files["flora2"]


def test_unknown_id_never_relists_the_store(make_store, objects, adapter_files, redis_client, prefix, fast_checks):
    store = make_store(objects)
    store.push("a", files=adapter_files["lora8"])
    objects.calls.clear()
    for _ in range(50):
        with pytest.raises(AdapterNotFound, match="'nope' not found"):
            store.current("nope")
    assert objects.calls == Counter()  # the marker is there: nothing but one EXISTS per miss

    delete_prefix(redis_client, prefix)
    for _ in range(50):
        with pytest.raises(AdapterNotFound, match="'nope' not found"):
            store.current("nope")
    assert manifest_lists(objects) == 1 and store.recovery.num_recoveries == 1  # the first miss rebuilt it
    assert store.current("a").version == 1


def test_misses_check_the_marker_at_most_once_per_interval(make_store, objects, adapter_files):
    store = make_store(objects)
    store.push("a", files=adapter_files["lora8"])
    checks = count_marker_checks(store)
    start = time.monotonic()
    num_misses = 0
    while time.monotonic() - start < 0.5:
        with pytest.raises(AdapterNotFound):
            store.current(f"nope-{num_misses}")
        num_misses += 1
    assert num_misses > 50 and checks["marker"] <= 1


def test_concurrent_misses_after_loss_reindex_once(make_store, objects, adapter_files, redis_client, prefix):
    make_store(objects).push("a", files=adapter_files["lora8"])
    make_store(objects).push("b", files=adapter_files["lora4"])
    delete_prefix(redis_client, prefix)
    objects.calls.clear()
    processes = [make_store(objects) for _ in range(3)]  # three processes' stores, 8 threads each
    barrier = threading.Barrier(24)
    found, errors = [], []

    def lookup(store: AdapterStore, adapter_id: str) -> None:
        barrier.wait()
        try:
            found.append(store.current(adapter_id).adapter_id)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=lookup, args=(store, "ab"[i % 2])) for store in processes for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(found) == ["a"] * 12 + ["b"] * 12
    assert sum(store.recovery.num_recoveries for store in processes) == 1 and manifest_lists(objects) == 1


def test_fresh_store_is_not_reindexed(make_store, objects, adapter_files, redis_client, fast_checks):
    objects.inner.root.mkdir()
    store = make_store(objects)
    for _ in range(20):
        with pytest.raises(AdapterNotFound):
            store.current("x")
        assert store.list_current() == []
    assert manifest_lists(objects) == 1 and store.recovery.num_recoveries == 0  # listed once, found nothing
    assert json.loads(redis_client.get(store.registry.marker_key))["by"] == "empty object store"
    assert store.push("x", files=adapter_files["lora8"]).version == 1 and manifest_lists(objects) == 1


def test_fresh_store_without_its_directory_yet(make_store, objects, adapter_files, redis_client):
    store = make_store(objects)  # a local store whose directory the first push creates
    with pytest.raises(AdapterNotFound):
        store.current("x")
    assert not redis_client.exists(store.registry.marker_key)  # reads cannot tell it from an unmounted one
    assert store.push("x", files=adapter_files["lora8"]).version == 1
    assert json.loads(redis_client.get(store.registry.marker_key))["by"] == "empty object store"
    assert store.current("x").version == 1 and store.recovery.num_recoveries == 0


def test_all_removed_is_not_mistaken_and_stays_removed(make_store, objects, adapter_files, redis_client, prefix,
                                                        fast_checks):
    store = make_store(objects)
    store.push("a", files=adapter_files["lora8"])
    store.push("b", files=adapter_files["lora4"])
    store.remove("a")
    store.remove("b")
    objects.calls.clear()
    for _ in range(20):
        assert store.list_current() == []
        with pytest.raises(AdapterNotFound, match="'a' was removed"):
            store.current("a")
    assert objects.calls == Counter()  # an empty registry with its marker is just empty

    store.push("b", files=adapter_files["ia3"])  # back, as version 2
    delete_prefix(redis_client, prefix)
    router = make_store(objects)
    assert [(r.adapter_id, r.version) for r in router.list_current()] == [("b", 2)]
    with pytest.raises(AdapterNotFound, match="'a' was removed"):
        router.current("a")
    assert list(router.list_removed()) == ["a"] and router.recovery.num_recoveries == 1


def test_version_numbering_continues_after_loss(make_store, objects, adapter_files, redis_client, prefix):
    store = make_store(objects)
    store.push("a", files=adapter_files["lora8"])
    store.push("a", files=adapter_files["lora4"])
    delete_prefix(redis_client, prefix)
    assert store.push("a", files=adapter_files["ia3"]).version == 3  # the push rebuilt the registry first
    assert [r.version for r in store.versions("a")] == [1, 2, 3] and store.recovery.num_recoveries == 1


def test_push_racing_a_loss_rebuilds_before_registering(make_store, objects, adapter_files, redis_client, prefix):
    store = make_store(objects)
    store.push("a", files=adapter_files["lora8"])
    store.push("b", files=adapter_files["lora4"])
    is_lost = []

    def lose_once(key: str) -> None:  # Redis empties after the push's check, while it writes the blobs
        if key.startswith("blobs/") and not is_lost:
            is_lost.append(True)
            delete_prefix(redis_client, prefix)

    objects.on_put = lose_once
    assert store.push("a", files=adapter_files["ia3"]).version == 2
    assert is_lost and store.recovery.num_recoveries == 1
    assert [r.version for r in store.versions("a")] == [1, 2] and store.current("b").version == 1


def test_register_refuses_without_marker_and_lock_is_compare_and_set(redis_client, prefix):
    registry = Registry(redis_client, prefix)
    rec = VersionRecord("a", 1, "LORA", 8, {"q_proj": 8}, {CONFIG: ("c" * 64, 300), WEIGHTS: ("w" * 64, 600)},
                        time.time(), "tester")
    with pytest.raises(RegistryLost):
        registry.register(rec, registry.purge_epoch())
    assert registry.marker_state() == "lost"
    assert registry.lock_recovery("one", 5.0) and not registry.lock_recovery("two", 5.0)
    assert not registry.finish_recovery("two", "{}") and registry.marker_state() == "lost"
    redis_client.delete(registry.lock_key)  # what a restart in the middle of a rebuild does
    assert not registry.finish_recovery("one", "{}") and registry.marker_state() == "lost"
    assert registry.lock_recovery("three", 5.0) and registry.keep_recovery_lock("three", 5.0)
    assert registry.finish_recovery("three", "{}", rebuilt_s=5.0) and registry.marker_state() == "rebuilt"
    assert not redis_client.exists(registry.lock_key)
    redis_client.delete(registry.rebuilt_key)
    assert registry.marker_state() == "intact"
    registry.register(rec, registry.purge_epoch())
    assert registry.current("a").version == 1


def test_rebuild_held_elsewhere_waits_then_503_then_recovers(make_store, objects, adapter_files, redis_client, prefix,
                                                             monkeypatch):
    monkeypatch.setattr(registry_recovery, "WAIT_S", 0.3)
    make_store(objects).push("a", files=adapter_files["lora8"])
    delete_prefix(redis_client, prefix)
    router = make_store(objects)
    lock_key = router.registry.lock_key
    redis_client.set(lock_key, "another-process", px=60_000)  # a rebuild under way elsewhere
    with pytest.raises(StoreUnavailable, match="being rebuilt .* by another process"):
        router.current("a")
    with pytest.raises(StoreUnavailable, match="being rebuilt"):  # answered again without asking Redis
        router.current("a")
    redis_client.set(lock_key, "crashed-process", px=200)  # its holder died: the lock runs out by itself
    time.sleep(registry_recovery.CHECK_INTERVAL_S)
    assert router.current("a").version == 1 and router.recovery.num_recoveries == 1


def test_object_store_down_during_rebuild_is_503(make_store, private_s3_server, adapter_files, redis_client, prefix):
    objects = private_s3_server.object_store()
    make_store(objects).push("a", files=adapter_files["lora8"])
    delete_prefix(redis_client, prefix)
    router = make_store(objects)
    private_s3_server.stop()
    with pytest.raises(StoreUnavailable, match="has no marker .* cannot be rebuilt yet: object store s3://"):
        router.current("a")
    with pytest.raises(StoreUnavailable, match="cannot be rebuilt yet"):  # until the next check
        router.list_current()
    assert not redis_client.exists(router.registry.marker_key) and not redis_client.exists(router.registry.lock_key)
    private_s3_server.start()
    time.sleep(registry_recovery.CHECK_INTERVAL_S)
    assert router.current("a").version == 1


def test_missing_local_directory_is_not_taken_for_an_empty_store(make_store, adapter_files, redis_client, prefix,
                                                                 tmp_path):
    root = tmp_path / "objects"
    make_store(LocalDirObjectStore(root)).push("a", files=adapter_files["lora8"])
    delete_prefix(redis_client, prefix)
    router = make_store(LocalDirObjectStore(root))
    root.rename(tmp_path / "away")  # unmounted: the directory lists as empty
    with pytest.raises(AdapterNotFound):
        router.current("a")
    assert not redis_client.exists(router.registry.marker_key)  # not marked complete: looked at again later
    (tmp_path / "away").rename(root)
    time.sleep(registry_recovery.CHECK_INTERVAL_S)
    assert router.current("a").version == 1 and router.recovery.num_recoveries == 1


def test_placement_controller_adapter_info_rebuilds_a_lost_registry(make_store, objects, adapter_files,
                                                                   redis_client, prefix):
    """The rebalancer (Rebalancer.from_settings) reads ranks through the store: after a loss the solver still sees
    every adapter. The CLI end to end: tests/placement/test_cli_placement.py."""
    from lorafleet.placement.rebalancer import adapter_info_from

    store = make_store(objects)
    store.push("a", files=adapter_files["lora8"])
    store.push("b", files=adapter_files["ia3"])
    expected = {r.adapter_id: (r.max_rank, r.num_bytes) for r in store.list_current()}
    delete_prefix(redis_client, prefix)
    assert adapter_info_from(Registry(redis_client, prefix).list_current)() == {}   # a bare registry read: lost
    assert adapter_info_from(make_store(objects).list_current)() == expected   # another process: rebuilt, then read


def test_a_damaged_or_vanished_manifest_does_not_stop_the_rebuild(make_store, objects, adapter_files, redis_client,
                                                                  prefix, caplog):
    from lorafleet.infra.object_store import manifest_key
    from lorafleet.infra.store import manifest_name

    store = make_store(objects)
    store.push("good", files=adapter_files["lora8"])
    store.push("bad", files=adapter_files["ia3"])
    store.push("bad", files=adapter_files["lora4"])
    objects.put(manifest_key("bad", manifest_name(2)), b"{not json")   # v2's manifest damaged
    objects.put(manifest_key("gone", manifest_name(1)), b"{}")         # a record missing every field
    delete_prefix(redis_client, prefix)
    other = make_store(objects)
    with caplog.at_level("WARNING"):
        assert other.current("good").version == 1   # rebuilt despite the damaged manifests
    assert other.current("bad").version == 1   # its readable version is back; the damaged one is skipped
    with pytest.raises(AdapterNotFound):
        other.current("gone")
    assert "skipping damaged manifest" in caplog.text and "bad" in caplog.text
    assert store.push("bad", files=adapter_files["lora8"]).version == 3   # numbering still counts the damaged v2
