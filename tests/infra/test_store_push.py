"""AdapterStore push / get / remove / reindex on real Redis with a local-dir and a real S3 object store."""

from __future__ import annotations

import hashlib
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.infra.errors import (
    AdapterNotFound,
    AdapterTooLarge,
    InvalidAdapter,
    InvalidAdapterId,
    VersionConflict,
)
from lorafleet.infra.version_record import BUNDLE_FILES

CONFIG, WEIGHTS = BUNDLE_FILES


@pytest.fixture(params=["local", "s3"])
def any_store(request, make_store):
    if request.param == "local":
        return make_store()
    return make_store(request.getfixturevalue("s3_server").object_store())


def test_push_get_round_trip(any_store, adapter_dirs, adapter_files):
    record = any_store.push("sql-r8", adapter_dirs["lora8"], owner="alice")
    assert (record.adapter_id, record.version, record.peft_type, record.owner) == ("sql-r8", 1, "LORA", "alice")
    assert record.module_ranks == {"q_proj": 8, "v_proj": 8}
    assert record.files[WEIGHTS][0] == hashlib.sha256(adapter_files["lora8"][WEIGHTS]).hexdigest()
    assert record.num_bytes == sum(len(b) for b in adapter_files["lora8"].values())
    fetched = any_store.get("sql-r8")
    assert fetched.files == adapter_files["lora8"] and fetched.version == "1"
    assert any_store.current("sql-r8") == record
    manifests = any_store.objects.list("manifests/sql-r8/")
    assert manifests == ["manifests/sql-r8/0000000001.json"]


def test_repush_makes_new_version(store, adapter_dirs, adapter_files):
    store.push("a", adapter_dirs["lora8"])
    second = store.push("a", files=adapter_files["flora2"])
    assert second.version == 2 and second.peft_type == "FLORA"
    assert [r.version for r in store.versions("a")] == [1, 2]
    assert store.get("a").files == adapter_files["flora2"]
    assert store.get("a", version=1).files == adapter_files["lora8"]
    assert [r.adapter_id for r in store.list_current()] == ["a"]


def test_push_if_changed_adds_a_version_only_for_new_content(store, adapter_dirs, adapter_files):
    first = store.push("a", adapter_dirs["lora8"], if_changed=True)   # nothing current: pushed
    again = store.push("a", adapter_dirs["lora8"], if_changed=True)   # same bytes: the current record
    assert (first.version, again.version) == (1, 1) and again.files == first.files
    assert store.push("a", adapter_dirs["lora8"]).version == 2   # without the flag: always a new version
    changed = store.push("a", files=adapter_files["flora2"], if_changed=True)
    assert changed.version == 3 and changed.peft_type == "FLORA"
    assert [r.version for r in store.versions("a")] == [1, 2, 3]


@pytest.mark.parametrize("damage,error,match", [
    (lambda f: {CONFIG: f[CONFIG], WEIGHTS: f[WEIGHTS][: len(f[WEIGHTS]) // 2]}, InvalidAdapter, "truncated"),
    (lambda f: {CONFIG: b"{not json", WEIGHTS: f[WEIGHTS]}, InvalidAdapter, "not valid JSON"),
    (lambda f: {WEIGHTS: f[WEIGHTS]}, InvalidAdapter, "adapter_config.json: missing"),
])
def test_failed_push_keeps_old_version(store, adapter_files, damage, error, match):
    store.push("a", files=adapter_files["lora8"])
    with pytest.raises(error, match=match):
        store.push("a", files=damage(adapter_files["ia3"]))
    assert store.current("a").version == 1
    assert [r.version for r in store.versions("a")] == [1]
    assert store.get("a").files == adapter_files["lora8"]


def test_oversized_and_rank_limits(make_store, adapter_dirs, adapter_files):
    small = make_store(max_bytes=10_000)
    with pytest.raises(AdapterTooLarge, match="over the limit of 10000 bytes"):
        small.push("big", adapter_dirs["lora8"])
    with pytest.raises(AdapterTooLarge):
        small.push("big", files=adapter_files["lora8"])
    with pytest.raises(InvalidAdapter, match="rank 8 is above the limit max_rank=4"):
        make_store(max_rank=4).push("r8", adapter_dirs["lora8"])
    with pytest.raises(AdapterNotFound):
        small.current("big")
    assert small.objects.list("") == []  # nothing written for a refused adapter


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_id=st.one_of(
    st.sampled_from(["..", ".", "../etc/passwd", "a/../../b", "/abs", "a\\b", "x" * 129, "", " a", "a\n",
                     "caf\u00e9", "\u0430dapter", "ad\u200bapter", "\uff41dapter", "a\x00b", "%2e%2e"]),
    st.text(min_size=1, max_size=40).filter(lambda s: any(c not in "abcdefghijklmnopqrstuvwxyz0123456789._-"
                                                          for c in s.lower())),
))
def test_invalid_ids_are_refused_before_anything_is_written(store, adapter_files, bad_id):
    with pytest.raises(InvalidAdapterId, match="invalid adapter id"):
        store.push(bad_id, files=adapter_files["ia3"])
    with pytest.raises(InvalidAdapterId):
        store.current(bad_id)
    with pytest.raises(InvalidAdapterId):
        store.remove(bad_id, purge=True)
    assert store.objects.list("") == []


def test_concurrent_pushes_end_with_one_consistent_winner(store, adapter_files):
    """Eight pushers of one id at once: every success has its own version, losers leave no trace, and the
    current record, its blobs and a fetch all agree on the newest successful push."""
    names = ["lora8", "lora4", "flora2", "ia3"] * 2
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(names))

    def push(i: int) -> None:
        barrier.wait()
        try:
            results[i] = store.push("hot", files=adapter_files[names[i]], owner=f"pusher-{i}")
        except VersionConflict as exc:
            results[i] = exc

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = {i: r for i, r in results.items() if not isinstance(r, Exception)}
    assert len(results) == len(names) and wins
    winner_i, winner = max(wins.items(), key=lambda kv: kv[1].version)
    current = store.current("hot")
    assert current == winner
    assert store.get("hot").files == adapter_files[names[winner_i]]
    assert sorted(r.version for r in store.versions("hot")) == sorted(r.version for r in wins.values())
    assert len({r.version for r in results.values() if not isinstance(r, Exception)}) == len(wins)


def test_soft_delete_then_purge_keeps_shared_blobs(store, adapter_files):
    store.push("a", files=adapter_files["lora8"])
    store.push("a", files=adapter_files["lora4"])
    store.push("b", files=adapter_files["lora4"])  # same bytes as a@2
    result = store.remove("a")
    assert result == {"adapter_id": "a", "removed_version": 2, "purged": False, "num_blobs_deleted": 0}
    with pytest.raises(AdapterNotFound, match="removed"):
        store.get("a")
    assert len(store.versions("a")) == 2 and store.get("a", version=1).files == adapter_files["lora8"]
    assert store.objects.exists("manifests/a/tombstone.json")
    third = store.push("a", files=adapter_files["ia3"])  # a re-push revives the id with a newer version
    assert third.version == 3 and store.current("a").version == 3
    purged = store.remove("a", purge=True)
    assert purged["purged"] and purged["num_blobs_deleted"] == 4  # a's lora8 and ia3 files; lora4's stay for b
    assert store.objects.list("manifests/a/") == []
    with pytest.raises(AdapterNotFound):
        store.versions("a")
    assert store.get("b").files == adapter_files["lora4"]  # b's blobs (shared with a@2) survive
    with pytest.raises(AdapterNotFound):
        store.remove("a", purge=True)


def test_reindex_rebuilds_a_lost_registry(store, adapter_files, redis_client, prefix):
    """By hand; the same rebuild runs by itself on the next miss (test_registry_recovery.py)."""
    store.push("a", files=adapter_files["lora8"])
    store.push("a", files=adapter_files["lora4"])
    store.push("gone", files=adapter_files["ia3"])
    store.remove("gone")
    redis_client.delete(*redis_client.scan_iter(match=f"{prefix}:*"))  # Redis lost everything
    counts = store.reindex()
    assert counts == {"live": 1, "deleted": 1, "num_versions": 3}
    assert redis_client.exists(store.registry.marker_key) and not redis_client.exists(store.registry.lock_key)
    assert store.current("a").version == 2 and [r.version for r in store.versions("a")] == [1, 2]
    assert store.push("a", files=adapter_files["flora2"]).version == 3  # never reuses a stored version number
    assert store.get("a", version=1).files == adapter_files["lora8"]
    with pytest.raises(AdapterNotFound, match="removed"):
        store.current("gone")
    assert store.reindex() == {"live": 1, "deleted": 1, "num_versions": 4}  # idempotent


def test_from_settings_local_and_s3(monkeypatch, prefix, tmp_path, tiny_model_dir, s3_server, adapter_dirs):
    from lorafleet.infra.config import load_settings
    from lorafleet.infra.object_store import LocalDirObjectStore, S3ObjectStore
    from lorafleet.infra.store import AdapterStore

    local = AdapterStore.from_settings(load_settings(
        store_url=str(tmp_path / "s"), redis_prefix=prefix, model_dir=str(tiny_model_dir), hot_cache_max_bytes=123))
    assert isinstance(local.objects, LocalDirObjectStore) and local.hot.max_bytes == 123
    assert local.push("a", adapter_dirs["ia3"]).version == 1
    s3_server.client().create_bucket(Bucket="from-settings")
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    remote = AdapterStore.from_settings(load_settings(
        store_url="s3://from-settings/fleet", s3_endpoint_url=s3_server.endpoint, redis_prefix=f"{prefix}-s3",
        model_dir=str(tiny_model_dir)))
    assert isinstance(remote.objects, S3ObjectStore)
    try:
        assert remote.push("a", adapter_dirs["ia3"]).version == 1
        assert remote.get("a").files == local.get("a").files
    finally:
        remote.redis.delete(*remote.redis.scan_iter(match=f"{prefix}-s3:*"))


def test_unexpected_files_and_missing_base(make_store, adapter_files, tmp_path):
    store = make_store()
    with pytest.raises(InvalidAdapter, match="pytorch_model.bin: unexpected file"):
        store.push("a", files={**adapter_files["ia3"], "pytorch_model.bin": b"pickle"})
    with pytest.raises(InvalidAdapter, match="no base model"):
        make_store(base=None).push("a", files=adapter_files["ia3"])
