"""AdapterCache: the one owner of a replica's adapter residency — device slots <- host tier <- AdapterSource.

- watch(id) when a request arrives starts fetching its adapter on a loader thread (prefetch); requests whose
  adapter is loading wait in the scheduler without blocking others. prefetch(ids) does the same ahead of demand.
- try_acquire(id) pins the adapter in device row pools, evicting the least recently used adapter that no running
  request uses; a pinned adapter is never evicted. The host tier keeps validated weights within a byte budget.
- Freshness: store events ('updated', 'removed') and a resync — on every reconnect of the event feed and every
  `resync_interval_s` — compare what is held with the source's current versions; a stale copy is retired (its
  rows stay until the requests running on it finish, so no request mixes two versions) and refetched when wanted.
- Placement: assign(ids) takes the adapters the published routing table gives this replica: fetched into the host
  tier at once, installed on the device as room allows (install_assigned, lowest priority), the ones no longer
  assigned demoted (first to be evicted).
- A fetch or validation error marks the adapter failed: the requests waiting on it fail with that error, then the
  entry is dropped so a later request retries.
One component, three files: this one (entries, host tier, device pools, fetches), adapter_freshness.py (events,
resync) and adapter_assignment.py (the table's assignment), mixed into AdapterCache.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorafleet.infra.adapter_ids import validate_adapter_id
from lorafleet.infra.adapter_source import AdapterSource, VersionedSource
from lorafleet.infra.adapters import AdapterWeights
from lorafleet.infra.errors import AdapterNotFound, LoRAFleetError, StoreUnavailable
from lorafleet.replicas.adapter_assignment import AssignmentMixin
from lorafleet.replicas.adapter_entry import AdapterEntry, is_older
from lorafleet.replicas.adapter_freshness import FreshnessMixin
from lorafleet.replicas.adapter_loader import AdapterLoader
from lorafleet.replicas.adapter_pool import AdapterPools
from lorafleet.replicas.scheduler import AdapterStatus

logger = logging.getLogger("lorafleet.replica")


class AdapterCache(FreshnessMixin, AssignmentMixin):
    """Implements the scheduler's AdapterGate. Loader threads only fetch + validate + convert on the host; the
    device pools are written under the lock, by the engine thread (try_acquire) or when a copy is retired."""

    def __init__(self, pools: AdapterPools, loader: AdapterLoader, source: AdapterSource | None, *,
                 host_cache_max_bytes: int, num_loaders: int, resync_interval_s: float = 0.0) -> None:
        self.pools = pools
        self.loader = loader
        self.spec = loader.spec
        self.source = source
        self.host_cache_max_bytes = host_cache_max_bytes
        self._lock = threading.RLock()   # entries are shared with loader, event and resync threads
        self._entries: dict[str, AdapterEntry] = {}
        self._paths: dict[str, Path] = {}
        self._stale: dict[int, AdapterEntry] = {}    # slot -> replaced/unloaded entry still pinned by requests
        self._device_lru: OrderedDict[str, None] = OrderedDict()   # resident, unpinned; oldest first
        self._host_lru: OrderedDict[str, None] = OrderedDict()     # ready on the host; oldest first
        self._executor = ThreadPoolExecutor(max_workers=num_loaders, thread_name_prefix="adapter-loader")
        self.stats = {"loads": 0, "load_failures": 0, "hits": 0, "installs": 0, "evictions": 0,
                      "compactions": 0, "host_evictions": 0, "stale_replaced": 0, "resyncs": 0, "prefetches": 0,
                      "prefetch_installs": 0}
        self._assigned: dict[str, None] = {}   # the routing table's adapters for this replica, largest share first
        self._is_install_pending = False
        self._closed = threading.Event()
        self._subscription = None
        if isinstance(source, VersionedSource):
            self._subscription = source.subscribe(self._on_event)
            if resync_interval_s > 0:
                threading.Thread(target=self._resync_loop, args=(resync_interval_s,), daemon=True,
                                 name="adapter-resync").start()

    # -- registration (engine API) ------------------------------------------------------------------
    def load(self, adapter_id: str, path: str | Path) -> AdapterWeights:
        """Read and validate an adapter directory now (InvalidAdapter on error) and serve it as adapter_id."""
        validate_adapter_id(adapter_id)
        weights = self.loader.from_dir(path)
        with self._lock:
            self._paths[adapter_id] = Path(path)
            old = self._entries.get(adapter_id)
            entry = AdapterEntry("ready", weights, version=f"path:{path}", is_from_path=True)
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
            entry = self._entries.get(adapter_id) or self._start_fetch(adapter_id)
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

    def prefetch(self, adapter_ids: Iterable[str]) -> int:
        """Fetch adapters not held yet into the host tier, ahead of their requests; returns how many started."""
        num_started = 0
        with self._lock:
            for adapter_id in adapter_ids:
                validate_adapter_id(adapter_id)
                if adapter_id not in self._entries:
                    self._start_fetch(adapter_id)
                    num_started += 1
            self.stats["prefetches"] += num_started
        return num_started

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
                        self._uninstall_entry(self._entries[self._device_lru.popitem(last=False)[0]])
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
                    self._is_install_pending = bool(self._assigned)
                else:
                    self._device_lru[adapter_id] = None

    # -- what is where ------------------------------------------------------------------------------------
    def residency(self, adapter_id: str) -> str:
        """Where the adapter is now: 'device' (in the row pools), 'host' (fetched), 'loading' or 'cold'."""
        entry = self._entries.get(adapter_id)
        if entry is None or entry.status == "failed":
            return "cold"
        if entry.status == "loading":
            return "loading"
        return "device" if entry.slot is not None else "host"

    def facts(self, adapter_id: str) -> tuple[int, int] | None:
        """(max rank, bytes) of the adapter held (ready) for adapter_id, None if none."""
        entry = self._entries.get(adapter_id)
        weights = entry.weights if entry is not None and entry.status == "ready" else None
        return None if weights is None else (weights.max_rank, weights.num_bytes)

    def version(self, adapter_id: str) -> str | None:
        """The version held (ready) for adapter_id, None if none."""
        entry = self._entries.get(adapter_id)
        return entry.version if entry is not None and entry.status == "ready" else None

    def info(self) -> dict:
        with self._lock:
            resident = sorted(a for a, e in self._entries.items() if e.slot is not None)
            return {
                "resident": resident,
                "num_resident": len(resident),
                "num_pinned": sum(1 for e in self._entries.values() if e.num_pins > 0),
                "num_host": len(self._host_lru),
                "num_loading": sum(1 for e in self._entries.values() if e.status == "loading"),
                "num_assigned": len(self._assigned),
                "free_rows": self.pools.allocator.num_free_rows,
                "num_validations": self.loader.num_validations,
                "num_revalidations_skipped": self.loader.num_revalidations_skipped,
                **self.stats,
            }

    def close(self) -> None:
        self._closed.set()
        if self._subscription is not None:
            self._subscription.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals ------------------------------------------------------------------------------------
    def _start_fetch(self, adapter_id: str) -> AdapterEntry:
        entry = self._entries[adapter_id] = AdapterEntry("loading")
        self._executor.submit(self._fetch, adapter_id, entry)
        return entry

    def _fetch(self, adapter_id: str, entry: AdapterEntry) -> None:
        while True:
            version, weights, error = self._load(adapter_id)
            with self._lock:
                if not self._is_current(adapter_id, entry):
                    return          # unloaded or replaced meanwhile
                if error is None and entry.newer_than and is_older(version, entry.newer_than):
                    entry.newer_than = ""
                    continue        # an update was announced while this fetch read the older version
                if error is None:
                    entry.status, entry.weights, entry.version = "ready", weights, version
                    entry.is_from_path = version.startswith("path:")
                    self.stats["loads"] += 1
                    self._is_install_pending |= adapter_id in self._assigned
                    self._touch_host(adapter_id)
                    self._evict_host()
                else:
                    entry.status, entry.error = "failed", error
                    self.stats["load_failures"] += 1
                    if entry.num_waiting <= 0:
                        del self._entries[adapter_id]
                return

    def _is_current(self, adapter_id: str, entry: AdapterEntry) -> bool:
        return self._entries.get(adapter_id) is entry

    def _load(self, adapter_id: str) -> tuple[str, AdapterWeights | None, Exception | None]:
        try:
            path = self._paths.get(adapter_id)
            if path is not None:
                return f"path:{path}", self.loader.from_dir(path), None
            if self.source is None:
                raise AdapterNotFound(f"adapter '{adapter_id}' is not loaded and the engine has no adapter source")
            fetched = self.source.fetch(adapter_id)
            return fetched.version, self.loader.from_fetched(fetched), None
        except LoRAFleetError as exc:
            return "", None, exc
        except Exception as exc:  # a source's own bug or I/O error must fail this request only
            return "", None, StoreUnavailable(f"adapter '{adapter_id}': fetch failed: {exc!r}")

    def _touch_host(self, adapter_id: str) -> None:
        self._host_lru[adapter_id] = None
        self._host_lru.move_to_end(adapter_id)

    def _evict_host(self) -> None:
        """Drop host copies over the byte budget: oldest first, only adapters nobody waits for or runs."""
        total = sum(w.num_bytes for a in self._host_lru if (w := self._entries[a].weights) is not None)
        if total <= self.host_cache_max_bytes:
            return
        # Adapters the table does not assign here go first, then assigned ones, each oldest first.
        order = sorted(self._host_lru, key=lambda a: a in self._assigned)   # stable: oldest first within each
        for adapter_id in order:
            if total <= self.host_cache_max_bytes:
                break
            entry = self._entries[adapter_id]
            if entry.num_waiting > 0 or entry.num_pins > 0 or entry.slot is not None:
                continue
            total -= entry.weights.num_bytes if entry.weights else 0
            del self._entries[adapter_id], self._host_lru[adapter_id]
            self.stats["host_evictions"] += 1

    def _retire(self, adapter_id: str, entry: AdapterEntry) -> None:
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

    def _uninstall_entry(self, entry: AdapterEntry) -> None:
        assert entry.num_pins == 0 and entry.slot is not None
        self.pools.uninstall(entry.slot)
        entry.slot = None
