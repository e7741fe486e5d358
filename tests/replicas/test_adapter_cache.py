"""Adapter cache: row allocation, LRU eviction of unpinned adapters, compaction, prefetch, failures."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from lorafleet.infra.adapter_maker import make_adapter
from lorafleet.infra.adapter_source import FetchedAdapter, LocalDirSource
from lorafleet.infra.adapters import load_adapter_dir
from lorafleet.infra.base_spec import BaseModelSpec
from lorafleet.infra.errors import AdapterNotFound, InvalidAdapter, InvalidAdapterId
from lorafleet.replicas import SamplingParams
from lorafleet.replicas.adapter_cache import AdapterCache
from lorafleet.replicas.adapter_loader import AdapterLoader
from lorafleet.replicas.adapter_pool import AdapterPools, RowAllocator, module_index

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory):
    """root/<id>/ for LocalDirSource: lora-r{4,8}-{0..5}, flora-r2-0."""
    root = tmp_path_factory.mktemp("adapters")
    for rank in (4, 8):
        for i in range(6):
            make_adapter(root / f"lora-r{rank}-{i}", tiny_model_dir, "lora", rank, ATTN, seed=10 * rank + i)
    make_adapter(root / "flora-r2-0", tiny_model_dir, "flora", 2, ATTN + ["down_proj"], seed=3)
    return root


class GatedSource:
    """LocalDirSource that blocks fetches of some ids until released (simulates a slow store)."""

    def __init__(self, root, gated=()):
        self.inner = LocalDirSource(root)
        self.gates = {a: threading.Event() for a in gated}
        self.num_fetches = 0

    def fetch(self, adapter_id: str) -> FetchedAdapter:
        self.num_fetches += 1
        if adapter_id in self.gates:
            assert self.gates[adapter_id].wait(30)
        return self.inner.fetch(adapter_id)


def make_cache(tiny_model_dir, source, num_rows=32, num_slots=3, host_cache_bytes=1 << 30, resync_interval_s=0.0):
    spec = BaseModelSpec.from_model_dir(tiny_model_dir)
    pools = AdapterPools(spec.num_layers, spec.module_shapes, num_rows, num_slots, torch.float32, "cpu")
    loader = AdapterLoader(spec, pools.target_modules, max_rank=16, max_bytes=1 << 30, dtype=torch.float32,
                           pin_memory=False)
    return AdapterCache(pools, loader, source, host_cache_max_bytes=host_cache_bytes, num_loaders=2,
                        resync_interval_s=resync_interval_s)


def wait_ready(cache, *adapter_ids):
    deadline = time.monotonic() + 30
    while any(cache.adapter_status(a) == "loading" for a in adapter_ids):
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_row_allocator_first_fit_and_coalescing():
    rows = RowAllocator(16)
    assert [rows.allocate(4), rows.allocate(8), rows.allocate(4)] == [0, 4, 12]
    assert rows.allocate(1) is None
    rows.free(0, 4)
    rows.free(12, 4)
    assert rows.num_free_rows == 8 and rows.largest_free == 4 and rows.allocate(8) is None
    rows.free(4, 8)
    assert rows.largest_free == 16
    with pytest.raises(AssertionError, match="freed twice"):
        rows.free(2, 4)


def test_lru_evicts_least_recent_unpinned(tiny_model_dir, adapter_root):
    cache = make_cache(tiny_model_dir, LocalDirSource(adapter_root), num_rows=64, num_slots=2)
    ids = ["lora-r4-0", "lora-r4-1", "lora-r4-2"]
    for a in ids:
        cache.watch(a)
    wait_ready(cache, *ids)
    slot_a = cache.try_acquire(ids[0])
    cache.release(ids[0], slot_a)
    slot_b = cache.try_acquire(ids[1])
    cache.release(ids[1], slot_b)
    assert cache.try_acquire(ids[0]) == slot_a and cache.stats["hits"] == 1   # a is now the most recent
    cache.release(ids[0], slot_a)
    assert cache.try_acquire(ids[2]) == slot_b                                # so b is evicted
    assert cache.info()["num_resident"] == 2 and cache.stats["evictions"] == 1


def test_pinned_adapters_are_never_evicted(tiny_model_dir, adapter_root):
    cache = make_cache(tiny_model_dir, LocalDirSource(adapter_root), num_rows=64, num_slots=2)
    ids = ["lora-r4-0", "lora-r4-1", "lora-r4-2"]
    for a in ids:
        cache.watch(a)
    wait_ready(cache, *ids)
    slots = [cache.try_acquire(ids[0]), cache.try_acquire(ids[1])]
    assert cache.try_acquire(ids[2]) is None          # both pinned by running requests
    cache.release(ids[1], slots[1])
    assert cache.try_acquire(ids[2]) == slots[1]


def test_fragmented_rows_are_compacted_and_rows_survive_the_move(tiny_model_dir, adapter_root):
    cache = make_cache(tiny_model_dir, LocalDirSource(adapter_root), num_rows=16, num_slots=3)
    a, b, c, d = "lora-r4-0", "lora-r8-0", "lora-r4-1", "lora-r8-1"
    for x in (a, b, c, d):
        cache.watch(x)
    wait_ready(cache, a, b, c, d)
    slot_a, slot_b, slot_c = cache.try_acquire(a), cache.try_acquire(b), cache.try_acquire(c)
    assert [int(cache.pools.table.start[s]) for s in (slot_a, slot_b, slot_c)] == [0, 4, 12]
    cache.release(a, slot_a)
    cache.release(c, slot_c)
    slot_d = cache.try_acquire(d)                    # evicts a and c, then must close the gap around b
    assert slot_d is not None and cache.stats["compactions"] == 1
    assert int(cache.pools.table.start[slot_b]) == 0 and int(cache.pools.table.start[slot_d]) == 8
    spec = BaseModelSpec.from_model_dir(tiny_model_dir)
    for adapter_id, slot in ((b, slot_b), (d, slot_d)):
        weights = load_adapter_dir(adapter_root / adapter_id, spec)
        start = int(cache.pools.table.start[slot])
        for (layer, name), module in weights.modules.items():
            m = module_index(layer, name)
            torch.testing.assert_close(cache.pools.in_rows[m][start:start + module.rank], module.in_rows)
            torch.testing.assert_close(cache.pools.out_rows[m][start:start + module.rank], module.out_rows)
            assert int(cache.pools.table.rank[m, slot]) == module.rank
            assert float(cache.pools.table.scale[m, slot]) == pytest.approx(module.scale)


def test_prefetch_runs_in_background_and_failures_are_retried(tiny_model_dir, adapter_root):
    source = GatedSource(adapter_root, gated=["lora-r4-0"])
    cache = make_cache(tiny_model_dir, source)
    cache.watch("lora-r4-0")
    cache.watch("lora-r4-1")
    wait_ready(cache, "lora-r4-1")
    assert cache.adapter_status("lora-r4-0") == "loading"       # a slow fetch does not hold up others
    source.gates["lora-r4-0"].set()
    wait_ready(cache, "lora-r4-0")
    assert cache.adapter_status("lora-r4-0") == "ready"
    cache.watch("missing")
    wait_ready(cache, "missing")
    assert cache.adapter_status("missing") == "failed"
    assert isinstance(cache.adapter_error("missing"), AdapterNotFound)
    cache.unwatch("missing")                                     # its last request left: forget the failure
    fetches = source.num_fetches
    cache.watch("missing")
    wait_ready(cache, "missing")
    assert source.num_fetches == fetches + 1
    with pytest.raises(InvalidAdapterId):
        cache.watch("../etc")


def test_reload_while_pinned_keeps_old_rows_for_running_requests(tiny_model_dir, adapter_root):
    cache = make_cache(tiny_model_dir, None)
    cache.load("x", adapter_root / "lora-r4-0")
    old_slot = cache.try_acquire("x")
    cache.load("x", adapter_root / "lora-r8-0")                  # new version while a request runs on the old
    new_slot = cache.try_acquire("x")
    assert new_slot != old_slot and int(cache.pools.table.num_rows[new_slot]) == 8
    cache.release("x", old_slot)                                 # the old version goes with its last pin
    assert int(cache.pools.table.num_rows[old_slot]) == 0
    cache.release("x", new_slot)
    assert cache.unload("x") and cache.info()["num_resident"] == 0


def test_host_tier_keeps_only_what_fits(tiny_model_dir, adapter_root):
    one = load_adapter_dir(adapter_root / "lora-r4-0", BaseModelSpec.from_model_dir(tiny_model_dir)).num_bytes
    cache = make_cache(tiny_model_dir, LocalDirSource(adapter_root), host_cache_bytes=2 * one)
    ids = [f"lora-r4-{i}" for i in range(4)]
    for a in ids:
        cache.watch(a)
    wait_ready(cache, *ids)
    assert cache.info()["num_host"] == 4                         # waited for: kept whatever the budget
    for a in ids:
        cache.unwatch(a)
    assert cache.info()["num_host"] == 2 and cache.stats["host_evictions"] == 2


def test_each_version_is_validated_once_and_a_new_version_again(tiny_model_dir, adapter_root, tmp_path):
    root = tmp_path / "root"
    for name in ("lora-r4-0", "lora-r4-1"):
        shutil.copytree(adapter_root / name, root / name)
    one = load_adapter_dir(root / "lora-r4-0", BaseModelSpec.from_model_dir(tiny_model_dir)).num_bytes
    cache = make_cache(tiny_model_dir, LocalDirSource(root), host_cache_bytes=one)   # room for one adapter
    for a in ("lora-r4-0", "lora-r4-1", "lora-r4-0"):   # the second evicts the first from the host tier
        cache.watch(a)
        wait_ready(cache, a)
        cache.unwatch(a)
    assert cache.stats["host_evictions"] == 2 and cache.stats["loads"] == 3
    info = cache.info()
    assert info["num_validations"] == 2 and info["num_revalidations_skipped"] == 1   # same bytes: no NaN rescan
    shutil.rmtree(root / "lora-r4-0")
    shutil.copytree(adapter_root / "lora-r8-0", root / "lora-r4-0")   # a new version under the same id
    assert cache.resync() == 1 and cache.residency("lora-r4-0") == "cold"   # held, unwanted: dropped, not fetched
    cache.watch("lora-r4-0")
    wait_ready(cache, "lora-r4-0")
    assert cache.info()["num_validations"] == 3 and cache.version("lora-r4-0") != cache.version("lora-r4-1")


def test_missing_and_invalid_adapters_fail_only_their_requests(make_engine, adapter_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(adapter_root, root)
    broken = root / "broken"
    shutil.copytree(adapter_root / "lora-r4-0", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = make_engine(adapter_source=LocalDirSource(root))
    params = SamplingParams(max_tokens=4, temperature=0)
    outs = engine.generate([[0, 5, 6]] * 5, params, adapters=[None, "lora-r4-0", "nope", "broken", "bad/id"])
    assert [o.finish_reason for o in outs] == ["length", "length", "error", "error", "error"]
    assert isinstance(outs[2].error, AdapterNotFound) and "nope" in str(outs[2].error)
    assert isinstance(outs[3].error, InvalidAdapter) and "adapter_model.safetensors" in str(outs[3].error)
    assert isinstance(outs[4].error, InvalidAdapterId)
    assert outs[0].token_ids != outs[1].token_ids
    assert engine.stats()["kv_blocks_used"] == 0


def test_request_waits_for_loading_adapter_without_blocking_others(make_engine, adapter_root):
    source = GatedSource(adapter_root, gated=["lora-r8-0"])
    engine = make_engine(adapter_source=source)
    params = SamplingParams(max_tokens=3, temperature=0)
    slow = engine.add_request([0, 5, 6], params, "lora-r8-0")
    fast = [engine.add_request([0, 5, 6], params, a) for a in (None, "lora-r4-0")]
    finished = {}
    deadline = time.monotonic() + 30
    while not all(f in finished for f in fast):
        assert time.monotonic() < deadline
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert slow not in finished and engine.stats()["num_waiting"] == 1
    source.gates["lora-r8-0"].set()
    while engine.has_unfinished():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert finished[slow].finish_reason == "length"
    alone = engine.generate([[0, 5, 6]], params, adapters=["lora-r8-0"])[0]
    assert finished[slow].token_ids == alone.token_ids


def test_more_adapters_than_slots_all_served_correctly(make_engine, adapter_root):
    engine = make_engine(adapter_source=LocalDirSource(adapter_root), max_adapters=2, adapter_pool_rows=64)
    params = SamplingParams(max_tokens=5, temperature=0)
    ids = [f"lora-r{r}-{i}" for r in (4, 8) for i in range(3)] + ["flora-r2-0"]
    alone = {a: engine.generate([[0, 9, 8, 7]], params, adapters=[a])[0].token_ids for a in ids}
    outs = engine.generate([[0, 9, 8, 7]] * (2 * len(ids)), params, adapters=ids * 2)
    assert [o.token_ids for o in outs] == [alone[a] for a in ids * 2]
    info = engine.stats()["adapters"]
    assert info["num_resident"] <= 2 and info["evictions"] > 0 and info["num_pinned"] == 0


def test_engine_target_modules_limit_pools_and_reject_other_adapters(make_engine, adapter_root):
    narrow = make_engine(target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), adapter_pool_rows=64)
    wide = make_engine(adapter_pool_rows=64)
    assert narrow.adapters.pools.num_bytes < wide.adapters.pools.num_bytes / 2
    narrow.load_adapter("attn", adapter_root / "lora-r4-0")
    with pytest.raises(InvalidAdapter, match=r"targets \['down_proj'\].*EngineConfig.target_modules"):
        narrow.load_adapter("mlp", adapter_root / "flora-r2-0")


def test_residency_and_resident_list(tiny_model_dir, adapter_root):
    cache = make_cache(tiny_model_dir, GatedSource(adapter_root, gated=["lora-r4-1"]))
    assert cache.residency("lora-r4-0") == "cold"
    cache.watch("lora-r4-0")
    cache.watch("lora-r4-1")
    wait_ready(cache, "lora-r4-0")
    assert cache.residency("lora-r4-0") == "host" and cache.residency("lora-r4-1") == "loading"
    cache.try_acquire("lora-r4-0")
    assert cache.residency("lora-r4-0") == "device" and cache.info()["resident"] == ["lora-r4-0"]
    cache.source.gates["lora-r4-1"].set()
    wait_ready(cache, "lora-r4-1")
