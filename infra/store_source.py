"""StoreSource: a replica's VersionedSource over the shared store — Redis hot blob, else the object store.

It holds no adapter copies (the replica's adapter cache owns residency); it looks up the current record, reads
the bundle and sha256-checks every byte against the record (a bad hot blob is dropped and refetched from the
object store; a bad object is AdapterCorrupt). One fetch per adapter per process at a time (single-flight).
While Redis is down it fetches adapters whose record it has seen straight from the object store.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

from lorafleet.infra.adapter_ids import validate_adapter_id
from lorafleet.infra.adapter_source import FetchedAdapter
from lorafleet.infra.errors import AdapterCorrupt, AdapterNotFound, ObjectNotFound, StoreUnavailable
from lorafleet.infra.events import AdapterEvent, EventListener
from lorafleet.infra.object_store import ObjectStore
from lorafleet.infra.single_flight import SingleFlight
from lorafleet.infra.store_metrics import StoreMetrics
from lorafleet.infra.version_record import BUNDLE_FILES, VersionRecord

MAX_KNOWN_RECORDS = 100_000  # last record seen per adapter (~1 KB each): lets an outage still reach S3
# After a failed registry lookup, fetches answer from what the replica has without asking Redis for this long,
# so a partitioned Redis costs one connect timeout per second, not one per request (reset on reconnect).
REGISTRY_RETRY_S = 1.0


def read_verified_blob(
    objects: ObjectStore, record: VersionRecord, name: str, on_mismatch: Callable[[], None] | None = None,
) -> bytes:
    """One file of `record` from the object store, sha256-checked; read twice before declaring it corrupt."""
    sha, size = record.files[name]
    where = f"adapter '{record.adapter_id}' version {record.version}: {name} (blob {sha[:12]}…) in {objects.url}"
    for _ in range(2):  # a second read tells a torn read from a corrupt object
        try:
            data = objects.get_blob(sha)
        except ObjectNotFound:
            raise AdapterCorrupt(f"{where} is missing; push the adapter again") from None
        if hashlib.sha256(data).hexdigest() == sha:
            return data
        if on_mismatch is not None:
            on_mismatch()
    raise AdapterCorrupt(
        f"{where} is corrupt: {len(data)} bytes with sha256 {hashlib.sha256(data).hexdigest()[:12]}…, "
        f"expected {size} bytes; push the adapter again"
    )


class StoreSource:
    """VersionedSource over an AdapterStore (duck-typed: registry, hot cache, objects, redis); thread-safe."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.metrics = StoreMetrics()
        self._flights = SingleFlight()
        self._known: OrderedDict[str, VersionRecord] = OrderedDict()
        self._known_lock = threading.Lock()
        self._registry_down_until = 0.0
        self._registry_error = ""
        self._listeners: list[EventListener] = []

    def __enter__(self) -> StoreSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    # -- VersionedSource -------------------------------------------------------------------------------
    def fetch(self, adapter_id: str) -> FetchedAdapter:
        """Current version of adapter_id; AdapterNotFound, AdapterCorrupt or StoreUnavailable otherwise."""
        validate_adapter_id(adapter_id)
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

    def current_versions(self, adapter_ids: Collection[str]) -> dict[str, str | None]:
        """One registry round trip for many ids (the replica's resync); StoreUnavailable while Redis is down."""
        records = self.store.current_many(list(adapter_ids))
        for record in records.values():
            if record is not None:
                self._remember(record)
        return {a: None if r is None else str(r.version) for a, r in records.items()}

    def subscribe(self, callback: Callable[[AdapterEvent], None]) -> EventListener:
        """Registry change events to `callback`, on a listener thread that reconnects by itself (each reconnect
        delivers a 'resync' event: whatever was published meanwhile is lost)."""

        def on_event(event: AdapterEvent) -> None:
            if event.kind == "removed":
                self._forget(event.adapter_id)
            elif event.kind == "resync":   # Redis is back: stop answering from memory alone
                self._registry_down_until = 0.0
            callback(event)

        listener = EventListener(self.store.redis, self.store.registry.channel, on_event).start()
        self._listeners.append(listener)
        return listener

    # -- internals ------------------------------------------------------------------------------------
    def _fetch(self, adapter_id: str) -> FetchedAdapter:
        start = time.perf_counter()
        try:
            record = self._lookup(adapter_id)
        except AdapterNotFound:
            self._forget(adapter_id)
            raise
        except StoreUnavailable:
            record = self._recall(adapter_id)   # Redis is down: the last record seen, from the object store
            if record is None:
                raise
            self.metrics.count("num_registry_down")
            files, tier = self._read_bundle(record, use_redis=False)
            return self._done(tier, record, files, start)
        self._remember(record)
        files, tier = self._read_bundle(record, use_redis=True)
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
        return FetchedAdapter(record.adapter_id, str(record.version), files, record.sha256)

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
