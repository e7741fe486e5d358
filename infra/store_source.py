"""StoreSource: the replica's AdapterSource over the store — host LRU → Redis hot blob → object store.

One fetch per adapter per process at a time (single-flight); every byte from Redis or the object store is
sha256-checked against the registry record (a bad hot blob is dropped and refetched from the object store;
a bad object is reported as AdapterCorrupt). While Redis is down the replica keeps serving what it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from lorafleet.infra.adapter_source import FetchedAdapter
from lorafleet.infra.errors import AdapterNotFound, StoreUnavailable
from lorafleet.infra.events import AdapterEvent, EventListener
from lorafleet.infra.host_cache import HostCache, HostEntry
from lorafleet.infra.single_flight import SingleFlight
from lorafleet.infra.store import read_verified_blob
from lorafleet.infra.store_metrics import StoreMetrics
from lorafleet.infra.version_record import BUNDLE_FILES, VersionRecord, check_adapter_id

if TYPE_CHECKING:
    from lorafleet.infra.store import AdapterStore

MAX_KNOWN_RECORDS = 100_000  # last record seen per adapter (~1 KB each): lets an outage still reach S3
# After a failed registry lookup, fetches answer from what the replica has without asking Redis for this long,
# so a partitioned Redis costs one connect timeout per second, not one per request (reset on reconnect).
REGISTRY_RETRY_S = 1.0


class StoreSource:
    """AdapterSource for the engine; thread-safe. `add_listener(fn)` gets every AdapterEvent (e.g. to drop
    device copies of an adapter that was updated or removed)."""

    def __init__(self, store: AdapterStore, host_cache_max_bytes: int = 2**30, *, subscribe: bool = True) -> None:
        self.store = store
        self.host = HostCache(host_cache_max_bytes)
        self.metrics = StoreMetrics()
        self._flights = SingleFlight()
        self._known: OrderedDict[str, VersionRecord] = OrderedDict()
        self._known_lock = threading.Lock()
        self._listeners: list[Callable[[AdapterEvent], None]] = []
        self._registry_down_until = 0.0
        self._registry_error = ""
        self.events: EventListener | None = None
        if subscribe:
            self.events = EventListener(store.redis, store.registry.channel, self._on_event).start()

    def __enter__(self) -> StoreSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()

    def add_listener(self, fn: Callable[[AdapterEvent], None]) -> None:
        self._listeners.append(fn)

    def invalidate(self, adapter_id: str) -> None:
        self.host.pop(adapter_id)

    def fetch(self, adapter_id: str) -> FetchedAdapter:
        """Current version of adapter_id; AdapterNotFound, AdapterCorrupt or StoreUnavailable otherwise."""
        check_adapter_id(adapter_id)
        try:
            fetched, is_shared = self._flights.do(adapter_id, lambda: self._fetch(adapter_id))
        except AdapterNotFound:
            raise
        except Exception:
            self.metrics.count("num_errors")
            raise
        if is_shared:
            self.metrics.count("num_coalesced")
        return fetched

    def _fetch(self, adapter_id: str) -> FetchedAdapter:
        start = time.perf_counter()
        stamp = self.events.stamp() if self.events is not None else None
        num_events = self.events.num_events if self.events is not None else 0
        entry = self.host.get(adapter_id)
        if entry is not None and stamp is not None and entry.stamp == stamp:
            return self._done("host", entry.record, entry.files, start)  # no event since it was checked
        try:
            record = self._lookup(adapter_id)
        except AdapterNotFound:
            self.host.pop(adapter_id)
            self._forget(adapter_id)
            raise
        except StoreUnavailable:
            # Redis is down: keep serving what this replica has, else the last record it saw (object store).
            record = entry.record if entry is not None else self._recall(adapter_id)
            if record is None:
                raise
            self.metrics.count("num_registry_down")
            if entry is not None:
                return self._done("host", entry.record, entry.files, start)
            files, tier = self._read_bundle(record, use_redis=False)
            self.host.put(adapter_id, HostEntry(record, files, None))  # unverified: rechecked once Redis is back
            return self._done(tier, record, files, start)
        self._remember(record)
        # The copy may be trusted unchecked later only if no event (or reconnect) happened meanwhile.
        unchanged = self.events is not None and self.events.stamp() == stamp and self.events.num_events == num_events
        new_stamp = stamp if unchanged else None
        if entry is not None and entry.record.sha256 == record.sha256:
            entry.stamp = new_stamp
            return self._done("host", record, entry.files, start)
        files, tier = self._read_bundle(record, use_redis=True)
        self.host.put(adapter_id, HostEntry(record, files, new_stamp))
        return self._done(tier, record, files, start)

    def _lookup(self, adapter_id: str) -> VersionRecord:
        if time.monotonic() < self._registry_down_until:
            raise StoreUnavailable(self._registry_error)
        try:
            return self.store.current(adapter_id)  # rebuilds a registry Redis lost (registry_recovery)
        except StoreUnavailable as exc:
            self._registry_error = str(exc)
            self._registry_down_until = time.monotonic() + REGISTRY_RETRY_S
            raise

    def _done(self, tier: str, record: VersionRecord, files: dict[str, bytes], start: float) -> FetchedAdapter:
        self.metrics.record_fetch(tier, time.perf_counter() - start)
        if tier == "host":
            self.metrics.add_bytes("host", record.num_bytes)
        return FetchedAdapter(record.adapter_id, str(record.version), files)

    def _read_bundle(self, record: VersionRecord, *, use_redis: bool) -> tuple[dict[str, bytes], str]:
        """Files of `record`, verified; tier = the slowest tier that had to serve part of it."""
        hot = self.store.hot
        shas = {name: record.files[name][0] for name in BUNDLE_FILES}
        files: dict[str, bytes] = {}
        if use_redis and hot.is_enabled:
            try:
                blobs = hot.get_many(sorted(set(shas.values())))
            except StoreUnavailable:
                blobs = {}
            for name, sha in shas.items():
                data = blobs.get(sha)
                if data is None:
                    continue
                if hashlib.sha256(data).hexdigest() == sha:
                    files[name] = data
                    self.metrics.add_bytes("redis", len(data))
                else:  # a bad hot copy is dropped, and the object store (the truth) is asked instead
                    self.metrics.count("num_hash_mismatches")
                    self._drop_hot(sha)
        tier = "redis"
        for name in BUNDLE_FILES:
            if name in files:
                continue
            tier = "object_store"
            data = read_verified_blob(self.store.objects, record, name,
                                      on_mismatch=lambda: self.metrics.count("num_hash_mismatches"))
            files[name] = data
            self.metrics.add_bytes("object_store", len(data))
            if use_redis and hot.can_put(len(data)):
                with contextlib.suppress(StoreUnavailable):  # an optimisation: the fetch itself succeeded
                    hot.put(shas[name], data)
        return files, tier

    def _drop_hot(self, sha256: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            self.store.hot.remove(sha256)

    def _remember(self, record: VersionRecord) -> None:
        with self._known_lock:
            self._known[record.adapter_id] = record
            self._known.move_to_end(record.adapter_id)
            while len(self._known) > MAX_KNOWN_RECORDS:
                self._known.popitem(last=False)

    def _recall(self, adapter_id: str) -> VersionRecord | None:
        with self._known_lock:
            return self._known.get(adapter_id)

    def _forget(self, adapter_id: str) -> None:
        with self._known_lock:
            self._known.pop(adapter_id, None)

    def _on_event(self, event: AdapterEvent) -> None:
        entry = self.host.get(event.adapter_id) if event.kind != "resync" else None
        if entry is not None and (event.kind == "removed" or entry.record.version < event.version):
            self.host.pop(event.adapter_id)
        if event.kind == "removed":
            self._forget(event.adapter_id)
        if event.kind == "resync":  # Redis is back: stop answering from memory alone
            self._registry_down_until = 0.0
        for fn in list(self._listeners):
            fn(event)
