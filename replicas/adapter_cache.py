"""Adapter cache of one engine: device slots <- host LRU <- AdapterSource, with background prefetch.

- watch(id) when a request arrives starts fetching its adapter on a loader thread (prefetch); requests
  whose adapter is loading wait in the scheduler without blocking others.
- try_acquire(id) pins the adapter in device row pools, evicting the least recently used adapter that
  no running request uses; a pinned adapter is never evicted.
- A fetch or validation error marks the adapter failed: the requests waiting on it fail with that error,
  then the entry is dropped so a later request retries.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorafleet.infra.adapter_source import AdapterSource
from lorafleet.infra.adapters import AdapterWeights, load_adapter_dir, load_adapter_files, validate_adapter_id
from lorafleet.infra.base_spec import BaseModelSpec
from lorafleet.infra.errors import AdapterNotFound, InvalidAdapter, LoRAFleetError, StoreUnavailable
from lorafleet.replicas.adapter_pool import AdapterPools
from lorafleet.replicas.scheduler import AdapterStatus


@dataclass(slots=True)
class _Entry:
    status: AdapterStatus
    weights: AdapterWeights | None = None
    error: Exception | None = None
    version: str = ""
    slot: int | None = None
    num_pins: int = 0          # running requests using it on the device
    num_waiting: int = 0       # requests in the engine that named it (host copy kept while > 0)
    is_stale: bool = False     # replaced or unloaded while pinned: uninstall when the last pin goes


class AdapterCache:
    """Implements the scheduler's AdapterGate. Loader threads only fetch + validate + convert on the host;
    the device pools are written by the engine thread alone (in try_acquire, between forward passes)."""

    def __init__(self, pools: AdapterPools, spec: BaseModelSpec, source: AdapterSource | None, *, max_rank: int,
                 max_bytes: int, host_cache_bytes: int, num_loaders: int, dtype: torch.dtype) -> None:
        self.pools = pools
        self.spec = spec
        self.source = source
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.host_cache_bytes = host_cache_bytes
        self.dtype = dtype
        self._lock = threading.Lock()   # entries are shared with loader threads
        self._entries: dict[str, _Entry] = {}
        self._paths: dict[str, Path] = {}
        self._stale: dict[int, _Entry] = {}    # slot -> replaced/unloaded entry still pinned by requests
        self._device_lru: OrderedDict[str, None] = OrderedDict()   # resident, unpinned; oldest first
        self._host_lru: OrderedDict[str, None] = OrderedDict()     # ready on the host; oldest first
        self._executor = ThreadPoolExecutor(max_workers=num_loaders, thread_name_prefix="adapter-loader")
        self.stats = {"loads": 0, "load_failures": 0, "hits": 0, "installs": 0, "evictions": 0,
                      "compactions": 0, "host_evictions": 0}

    # -- registration (engine API) ------------------------------------------------------------------
    def load(self, adapter_id: str, path: str | Path) -> AdapterWeights:
        """Read and validate an adapter directory now (InvalidAdapter on error) and serve it as adapter_id."""
        validate_adapter_id(adapter_id)
        weights = load_adapter_dir(path, self.spec, max_rank=self.max_rank, max_bytes=self.max_bytes)
        weights = self._convert(self._check_targets(weights, str(path)))
        with self._lock:
            self._paths[adapter_id] = Path(path)
            old = self._entries.get(adapter_id)
            entry = _Entry("ready", weights, version=f"path:{path}")
            if old is not None:
                entry.num_waiting = old.num_waiting
                self._retire(adapter_id, old)
            self._entries[adapter_id] = entry
            self._touch_host(adapter_id)
        return weights

    def unload(self, adapter_id: str) -> bool:
        """Forget an adapter (its registered path too); running requests keep it until they finish."""
        with self._lock:
            self._paths.pop(adapter_id, None)
            entry = self._entries.pop(adapter_id, None)
            if entry is not None:
                self._retire(adapter_id, entry)
            return entry is not None

    def watch(self, adapter_id: str) -> None:
        """A request names adapter_id: keep it (or start fetching it on a loader thread)."""
        validate_adapter_id(adapter_id)
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                entry = self._entries[adapter_id] = _Entry("loading")
                self._executor.submit(self._fetch, adapter_id, entry)
            entry.num_waiting += 1

    def unwatch(self, adapter_id: str) -> None:
        """A request that named adapter_id has left the engine."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return
            entry.num_waiting -= 1
            if entry.num_waiting <= 0 and entry.status == "failed":
                del self._entries[adapter_id]
            self._evict_host()

    # -- AdapterGate (engine thread) ------------------------------------------------------------------
    def adapter_status(self, adapter_id: str) -> AdapterStatus:
        entry = self._entries.get(adapter_id)
        return "failed" if entry is None else entry.status

    def adapter_error(self, adapter_id: str) -> Exception:
        entry = self._entries.get(adapter_id)
        if entry is None or entry.error is None:
            return AdapterNotFound(f"adapter '{adapter_id}' is not loaded")
        return entry.error

    def try_acquire(self, adapter_id: str) -> int | None:
        with self._lock:
            entry = self._entries[adapter_id]
            assert entry.status == "ready" and entry.weights is not None
            if entry.slot is None:
                num_rows = entry.weights.max_rank
                while not self.pools.can_install(num_rows):
                    if self.pools.can_install_after_compaction(num_rows):
                        self.pools.compact()
                        self.stats["compactions"] += 1
                    elif self._device_lru:
                        self._uninstall(self._device_lru.popitem(last=False)[0])
                        self.stats["evictions"] += 1
                    else:
                        return None
                entry.slot = self.pools.install(entry.weights)
                self.stats["installs"] += 1
            else:
                self.stats["hits"] += 1
                self._device_lru.pop(adapter_id, None)
            entry.num_pins += 1
            self._touch_host(adapter_id)
            return entry.slot

    def release(self, adapter_id: str, slot: int) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.slot != slot:
                entry = self._stale[slot]
            entry.num_pins -= 1
            assert entry.num_pins >= 0, f"adapter '{adapter_id}' released more often than acquired"
            if entry.num_pins == 0:
                if entry.is_stale:
                    del self._stale[slot]
                    self._uninstall_entry(entry)
                else:
                    self._device_lru[adapter_id] = None

    def residency(self, adapter_id: str) -> str:
        """Where the adapter is now: 'device' (in the row pools), 'host' (fetched), 'loading' or 'cold'."""
        entry = self._entries.get(adapter_id)
        if entry is None or entry.status == "failed":
            return "cold"
        if entry.status == "loading":
            return "loading"
        return "device" if entry.slot is not None else "host"

    def info(self) -> dict:
        with self._lock:
            resident = sorted(a for a, e in self._entries.items() if e.slot is not None)
            return {
                "resident": resident,
                "num_resident": len(resident),
                "num_pinned": sum(1 for e in self._entries.values() if e.num_pins > 0),
                "num_host": len(self._host_lru),
                "num_loading": sum(1 for e in self._entries.values() if e.status == "loading"),
                "free_rows": self.pools.allocator.num_free_rows,
                **self.stats,
            }

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals ------------------------------------------------------------------------------------
    def _fetch(self, adapter_id: str, entry: _Entry) -> None:
        try:
            path = self._paths.get(adapter_id)
            if path is not None:
                weights, version = load_adapter_dir(path, self.spec, max_rank=self.max_rank,
                                                    max_bytes=self.max_bytes), f"path:{path}"
            elif self.source is not None:
                fetched = self.source.fetch(adapter_id)
                weights = load_adapter_files(fetched.files, self.spec, max_rank=self.max_rank,
                                             max_bytes=self.max_bytes, source=f"adapter '{adapter_id}'")
                version = fetched.version
            else:
                raise AdapterNotFound(f"adapter '{adapter_id}' is not loaded and the engine has no adapter source")
            weights = self._convert(self._check_targets(weights, f"adapter '{adapter_id}'"))
            error = None
        except LoRAFleetError as exc:
            error = exc
        except Exception as exc:  # a source's own bug or I/O error must fail this request only
            error = StoreUnavailable(f"adapter '{adapter_id}': fetch failed: {exc!r}")
        with self._lock:
            if self._entries.get(adapter_id) is not entry:
                return          # unloaded or replaced meanwhile
            if error is None:
                entry.status, entry.weights, entry.version = "ready", weights, version
                self.stats["loads"] += 1
                self._touch_host(adapter_id)
                self._evict_host()
            else:
                entry.status, entry.error = "failed", error
                self.stats["load_failures"] += 1
                if entry.num_waiting <= 0:
                    del self._entries[adapter_id]

    def _check_targets(self, weights: AdapterWeights, source: str) -> AdapterWeights:
        extra = sorted(set(weights.target_modules) - set(self.pools.target_modules))
        if extra:
            raise InvalidAdapter(f"{source}: targets {extra}, but this engine serves adapters on "
                                 f"{list(self.pools.target_modules)} only (EngineConfig.target_modules)")
        return weights

    def _convert(self, weights: AdapterWeights) -> AdapterWeights:
        """Rows in the pool dtype once, on the loader thread, so install() is a plain copy."""
        pin = self.pools.in_rows[0].is_cuda if self.pools.in_rows else False
        modules = {}
        for key, m in weights.modules.items():
            in_rows, out_rows = m.in_rows.to(self.dtype).contiguous(), m.out_rows.to(self.dtype).contiguous()
            if pin:
                in_rows, out_rows = in_rows.pin_memory(), out_rows.pin_memory()
            modules[key] = replace(m, in_rows=in_rows, out_rows=out_rows)
        return replace(weights, modules=modules)

    def _touch_host(self, adapter_id: str) -> None:
        self._host_lru[adapter_id] = None
        self._host_lru.move_to_end(adapter_id)

    def _evict_host(self) -> None:
        """Drop host copies over the byte budget: oldest first, only adapters nobody waits for or runs."""
        total = sum(w.num_bytes for a in self._host_lru if (w := self._entries[a].weights) is not None)
        for adapter_id in list(self._host_lru):
            if total <= self.host_cache_bytes:
                break
            entry = self._entries[adapter_id]
            if entry.num_waiting > 0 or entry.num_pins > 0 or entry.slot is not None:
                continue
            total -= entry.weights.num_bytes if entry.weights else 0
            del self._entries[adapter_id], self._host_lru[adapter_id]
            self.stats["host_evictions"] += 1

    def _retire(self, adapter_id: str, entry: _Entry) -> None:
        """An entry leaves the table (replaced or unloaded): free its slot now, or when its last pin goes."""
        self._host_lru.pop(adapter_id, None)
        self._device_lru.pop(adapter_id, None)
        if entry.slot is None:
            return
        if entry.num_pins == 0:
            self._uninstall_entry(entry)
        else:
            entry.is_stale = True
            self._stale[entry.slot] = entry

    def _uninstall(self, adapter_id: str) -> None:
        self._uninstall_entry(self._entries[adapter_id])

    def _uninstall_entry(self, entry: _Entry) -> None:
        assert entry.num_pins == 0 and entry.slot is not None
        self.pools.uninstall(entry.slot)
        entry.slot = None
