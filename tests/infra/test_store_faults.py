"""Store faults on real servers: Redis down and back, S3 down and back, corrupt and truncated blobs, purge races."""

from __future__ import annotations

import threading

import pytest
from lf_testing import wait_until

from lorafleet.infra.errors import AdapterCorrupt, AdapterNotFound, StoreUnavailable
from lorafleet.infra.object_store import LocalDirObjectStore, blob_key
from lorafleet.infra.redis_conn import connect
from lorafleet.infra.store import AdapterStore
from lorafleet.infra.store_source import StoreSource
from lorafleet.infra.version_record import BUNDLE_FILES

CONFIG, WEIGHTS = BUNDLE_FILES


def test_redis_down_replica_fetches_what_it_has_seen_then_recovers(throwaway_redis, base_spec, tmp_path,
                                                                   adapter_files):
    store = AdapterStore(LocalDirObjectStore(tmp_path / "objects"), connect(throwaway_redis.url, 1.0), "t",
                         base=base_spec)
    for name in ("lora8", "lora4", "ia3"):
        store.push(name, files=adapter_files[name])
    events = []
    with StoreSource(store) as source:
        listener = source.subscribe(events.append)
        assert listener.wait_live()
        source.fetch("lora8")
        source.fetch("lora4")
        throwaway_redis.stop()
        wait_until(lambda: not listener.is_live)

        # The replica knows these records: straight from the object store (its adapter cache holds them anyway).
        assert source.fetch("lora8").files == adapter_files["lora8"]
        assert source.fetch("lora4").files == adapter_files["lora4"]
        with pytest.raises(StoreUnavailable, match=f"Redis at redis://127.0.0.1:{throwaway_redis.port}/0 is unreach"):
            source.fetch("ia3")
        with pytest.raises(StoreUnavailable):
            source.current_versions(["lora8"])   # a resync during the outage changes nothing
        num_blobs = len(store.objects.list("blobs/"))
        with pytest.raises(StoreUnavailable, match="adapter registry .* unreachable"):
            store.push("new", files=adapter_files["flora2"])
        assert len(store.objects.list("blobs/")) == num_blobs  # a failed push writes nothing
        with pytest.raises(StoreUnavailable):
            store.list_current()
        snap = source.metrics.snapshot()
        assert snap["num_registry_down"] == 2 and snap["num_errors"] == 1

        throwaway_redis.start()  # same port, empty (no persistence): the registry is rebuilt from the store
        wait_until(lambda: listener.is_live)
        wait_until(lambda: any(e.kind == "resync" for e in events))
        assert source.fetch("ia3").files == adapter_files["ia3"]  # the miss rebuilt the registry, no reindex by hand
        assert store.recovery.num_recoveries == 1 and [r.adapter_id for r in store.list_current()] == [
            "ia3", "lora4", "lora8"]
        record = store.push("lora8", files=adapter_files["flora2"])
        assert record.version == 2  # numbering continues from the object store's manifests
        wait_until(lambda: ("updated", "lora8", 2) in [(e.kind, e.adapter_id, e.version) for e in events])
        assert source.current_versions(["lora8"]) == {"lora8": "2"}
        assert source.fetch("lora8").files == adapter_files["flora2"]


def test_object_store_down_hot_tiers_keep_serving(private_s3_server, make_store, adapter_files):
    store = make_store(private_s3_server.object_store())
    store.push("a", files=adapter_files["lora8"])
    store.push("b", files=adapter_files["lora4"])
    with StoreSource(store) as first:
        first.fetch("a")  # hot blobs in Redis
    private_s3_server.stop()
    with StoreSource(store) as replica:
        assert replica.fetch("a").files == adapter_files["lora8"]  # from Redis
        with pytest.raises(StoreUnavailable, match="object store s3://"):
            replica.fetch("b")
    with pytest.raises(StoreUnavailable, match="s3://"):
        store.push("a", files=adapter_files["ia3"])
    assert store.current("a").version == 1 and [r.version for r in store.versions("a")] == [1]
    with pytest.raises(AdapterNotFound):
        store.current("c")
    private_s3_server.start()
    assert store.push("a", files=adapter_files["ia3"]).version == 3  # version 2 was allocated by the failed push
    with StoreSource(store) as replica:
        assert replica.fetch("b").files == adapter_files["lora4"]


@pytest.mark.parametrize("backend", ["local", "s3"])
@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_bad_blob_in_object_store_is_a_clear_error(request, make_store, adapter_files, backend, damage):
    objects = None if backend == "local" else request.getfixturevalue("s3_server").object_store()
    store = make_store(objects)
    record = store.push("a", files=adapter_files["lora8"])
    sha, size = record.files[WEIGHTS]
    good = adapter_files["lora8"][WEIGHTS]
    if damage == "missing":
        store.objects.delete_blob(sha)
    else:
        bad = good[: size // 3] if damage == "truncated" else good[:-1] + bytes([good[-1] ^ 1])
        store.objects.put(blob_key(sha), bad)  # what a cut-short upload or bit rot leaves behind
    match = "is missing" if damage == "missing" else f"is corrupt: .* expected {size} bytes"
    with StoreSource(store) as source:
        with pytest.raises(AdapterCorrupt, match=f"adapter 'a' version 1: {WEIGHTS} .*{match}"):
            source.fetch("a")
        assert source.metrics.snapshot()["num_hash_mismatches"] == (0 if damage == "missing" else 2)
    assert store.hot.get_many([sha]) == {}  # the bad bytes never reach the hot cache
    with pytest.raises(AdapterCorrupt):
        store.get("a")
    store.push("a", files=adapter_files["lora8"])  # re-pushing the same bytes repairs the blob
    with StoreSource(store) as source:
        assert source.fetch("a").files == adapter_files["lora8"]


def test_push_racing_purge_of_shared_blobs_never_dangles(store, adapter_files):
    """b is pushed with the very bytes a purge of a is deleting: b must end with every blob present."""
    for i in range(6):
        store.push("a", files=adapter_files["lora4"])
        barrier = threading.Barrier(2)
        errors = []

        def purge() -> None:
            barrier.wait()
            store.remove("a", purge=True)

        def push(adapter_id: str = f"b{i}") -> None:
            barrier.wait()
            try:
                store.push(adapter_id, files=adapter_files["lora4"])
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=purge), threading.Thread(target=push)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for name, (sha, _) in store.current(f"b{i}").files.items():
            assert store.objects.exists(blob_key(sha)), f"b{i}: {name} blob deleted by the purge"
        assert store.get(f"b{i}").files == adapter_files["lora4"]
