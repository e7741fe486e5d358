"""Redis registry: atomic register / remove / purge with events, version order, blob refs, fast listing."""

from __future__ import annotations

import json
import time

import pytest

from lorafleet.infra.errors import AdapterNotFound, InvalidAdapterId, VersionConflict
from lorafleet.infra.events import AdapterEvent, EventListener
from lorafleet.infra.registry import PurgeRace, Registry
from lorafleet.infra.version_record import BUNDLE_FILES, VersionRecord

CONFIG, WEIGHTS = BUNDLE_FILES


def record(adapter_id: str, version: int, config_sha: str = "c" * 64, weights_sha: str = "w" * 64) -> VersionRecord:
    return VersionRecord(adapter_id, version, "LORA", 8, {"q_proj": 8, "v_proj": 4},
                         {CONFIG: (config_sha, 300), WEIGHTS: (weights_sha, 60_000)}, time.time(), "tester")


@pytest.fixture
def registry(redis_client, prefix):
    registry = Registry(redis_client, prefix)
    redis_client.set(registry.marker_key, "{}")  # a complete registry (test_registry_recovery.py: without one)
    return registry


def register(registry: Registry, rec: VersionRecord) -> None:
    registry.register(rec, registry.purge_epoch())


def test_record_json_round_trip():
    rec = record("a", 3)
    again = VersionRecord.from_json(rec.to_json())
    assert again == rec and again.sha256 == rec.sha256 and again.num_bytes == 60_300
    assert rec.ranks == [4, 8] and rec.target_modules == ["q_proj", "v_proj"]
    assert record("a", 3, weights_sha="x" * 64).sha256 != rec.sha256
    newer_writer = json.loads(rec.to_json()) | {"field_from_the_future": 1}
    assert VersionRecord.from_json(json.dumps(newer_writer)) == rec


def test_register_current_versions(registry):
    assert registry.allocate_version("a") == 1
    register(registry, record("a", 1))
    assert registry.allocate_version("a") == 2
    register(registry, record("a", 2, weights_sha="2" * 64))
    assert registry.current("a").version == 2
    assert [r.version for r in registry.versions("a")] == [1, 2]
    assert registry.get_version("a", 1).files[WEIGHTS][0] == "w" * 64
    assert registry.num_refs("w" * 64) == 1 and registry.num_refs("c" * 64) == 2
    with pytest.raises(AdapterNotFound, match="'b' not found"):
        registry.current("b")
    with pytest.raises(AdapterNotFound, match="no version 7"):
        registry.get_version("a", 7)


def test_allocate_respects_floor(registry):
    assert registry.allocate_version("a", floor=41) == 42
    assert registry.allocate_version("a", floor=3) == 43


def test_older_version_never_replaces_newer(registry):
    register(registry, record("a", 5))
    with pytest.raises(VersionConflict, match="version 5 was pushed or removed concurrently; version 4"):
        register(registry, record("a", 4, weights_sha="4" * 64))
    assert registry.current("a").version == 5
    assert [r.version for r in registry.versions("a")] == [5]  # the loser left no trace
    assert registry.num_refs("4" * 64) == 0


def test_register_refuses_after_a_purge_started(registry):
    epoch = registry.purge_epoch()
    register(registry, record("x", 1, weights_sha="e" * 64))
    registry.begin_purge("x")  # bumps the epoch, marks x's blobs as purging
    with pytest.raises(PurgeRace, match="purge ran"):
        registry.register(record("a", 1, weights_sha="e" * 64), epoch)
    with pytest.raises(PurgeRace, match="being purged"):
        register(registry, record("a", 1, weights_sha="e" * 64))
    registry.end_purge(["e" * 64, "c" * 64])
    register(registry, record("a", 1, weights_sha="e" * 64))
    assert registry.current("a").version == 1


def test_remove_is_soft_and_purge_frees_unshared_blobs(registry):
    register(registry, record("a", 1, weights_sha="1" * 64))
    register(registry, record("a", 2, weights_sha="2" * 64))
    register(registry, record("b", 1, weights_sha="2" * 64))  # b shares a's v2 weights and the config
    tomb = registry.remove("a")
    assert tomb["version"] == 2
    with pytest.raises(AdapterNotFound, match="'a' was removed at .* \\(version 2\\)"):
        registry.current("a")
    assert [r.version for r in registry.versions("a")] == [1, 2]  # history kept
    assert list(registry.list_removed()) == ["a"]
    with pytest.raises(AdapterNotFound):
        registry.remove("a")
    with pytest.raises(VersionConflict):  # a push that allocated v2 before the delete must not revive it
        register(registry, record("a", 2, weights_sha="9" * 64))
    freed = registry.begin_purge("a")
    registry.end_purge(freed)
    assert freed == ["1" * 64]  # "2"*64 and the config are still used by b
    assert registry.list_removed() == {}
    with pytest.raises(AdapterNotFound, match="'a' not found"):
        registry.versions("a")
    with pytest.raises(AdapterNotFound):
        registry.begin_purge("a")
    assert registry.current("b").version == 1


def test_events_published_atomically_with_changes(registry, redis_client):
    events: list[AdapterEvent] = []
    listener = EventListener(redis_client, registry.channel, events.append).start()
    try:
        assert listener.wait_live()
        register(registry, record("a", 1))
        registry.remove("a")
        register(registry, record("b", 1))
        registry.begin_purge("b")
        deadline = time.monotonic() + 5
        while len(events) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        listener.close()
    assert [(e.kind, e.adapter_id, e.version) for e in events] == [
        ("updated", "a", 1), ("removed", "a", 1), ("updated", "b", 1), ("removed", "b", 1)]
    assert not listener.is_live


def test_restore_rebuilds_and_never_rolls_back(registry):
    records = [record("a", 1), record("a", 2, weights_sha="2" * 64)]
    assert registry.restore("a", records, None) == "live"
    assert registry.current("a").version == 2 and registry.num_refs("2" * 64) == 1
    assert registry.allocate_version("a") == 3
    register(registry, record("a", 3, weights_sha="3" * 64))
    assert registry.restore("a", records, None) == "live"
    assert registry.current("a").version == 3  # the newer version Redis had is kept
    assert registry.restore("a", records, {"version": 3, "deleted": time.time()}) == "deleted"
    with pytest.raises(AdapterNotFound, match="removed"):
        registry.current("a")


def test_thousand_adapters_list_fast(registry, redis_client):
    pipe = redis_client.pipeline(transaction=False)
    for i in range(1000):
        pipe.hset(registry.registry_key, f"adapter-{i:04d}", record(f"adapter-{i:04d}", 1 + i % 3).to_json())
    pipe.execute()
    start = time.perf_counter()
    listed = registry.list_current()
    elapsed = time.perf_counter() - start
    assert len(listed) == 1000 and listed[0].adapter_id == "adapter-0000"
    assert elapsed < 0.25, f"listing 1000 adapters took {elapsed:.3f} s"


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", "", "x" * 129, "ad\u0430pter", "a b", "a\x00"])
def test_registry_rejects_bad_ids(registry, bad):
    for call in (registry.current, registry.versions, registry.remove, registry.allocate_version):
        with pytest.raises(InvalidAdapterId):
            call(bad)
