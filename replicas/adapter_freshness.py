"""The freshness half of the AdapterCache: store events and resyncs replace stale copies (see adapter_cache.py)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from lorafleet.infra.adapter_source import VersionedSource
from lorafleet.infra.errors import StoreUnavailable
from lorafleet.infra.events import AdapterEvent
from lorafleet.replicas.adapter_entry import AdapterEntry, is_older

logger = logging.getLogger("lorafleet.replica")


class FreshnessMixin:
    """Part of AdapterCache (its state below): what is held stays the store's current version."""

    _lock: threading.RLock
    _entries: dict[str, AdapterEntry]
    _closed: threading.Event
    _device_lru: OrderedDict[str, None]
    source: Any
    stats: dict[str, int]

    if TYPE_CHECKING:   # AdapterCache's own methods
        def _retire(self, adapter_id: str, entry: AdapterEntry) -> None: ...

        def _start_fetch(self, adapter_id: str) -> AdapterEntry: ...

    # -- freshness: events and resync -------------------------------------------------------------------
    def resync(self) -> int:
        """Compare every store adapter held with the source's current version now; retire stale and removed
        copies (refetching the wanted ones). Returns how many were stale. StoreUnavailable: nothing changes."""
        if not isinstance(self.source, VersionedSource):
            return 0
        with self._lock:
            held = {a: e.version for a, e in self._entries.items() if e.status == "ready" and not e.is_from_path}
        if not held:
            return 0
        current = self.source.current_versions(list(held))
        num_stale = 0
        with self._lock:
            self.stats["resyncs"] += 1
            for adapter_id, version in current.items():
                entry = self._entries.get(adapter_id)
                if entry is None or entry.status != "ready" or entry.is_from_path:
                    continue
                if version is None or is_older(entry.version, version):
                    num_stale += 1
                    self._replace_stale(adapter_id, entry, refetch=version is not None)
        return num_stale

    def _on_event(self, event: AdapterEvent) -> None:
        if event.kind == "resync":   # the feed reconnected: events may have been missed
            self._resync_quietly()
            return
        with self._lock:
            entry = self._entries.get(event.adapter_id)
            if entry is None or entry.is_from_path:
                return
            version = str(event.version)
            if entry.status == "loading":   # its fetch may have read the version before this one
                entry.newer_than = version if event.kind == "updated" else entry.newer_than
                return
            if event.kind == "removed":
                self._replace_stale(event.adapter_id, entry, refetch=False)
            elif entry.status == "ready" and is_older(entry.version, version):
                self._replace_stale(event.adapter_id, entry, refetch=True)

    def _resync_loop(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            self._resync_quietly()

    def _resync_quietly(self) -> None:
        try:
            self.resync()
        except StoreUnavailable as exc:   # keep serving what is held; the next resync tries again
            logger.info("adapter resync skipped: %s", exc)
        except Exception:
            logger.exception("adapter resync failed")

    def _replace_stale(self, adapter_id: str, entry: AdapterEntry, *, refetch: bool) -> None:
        """Retire a stale copy (under the lock); refetch at once if requests wait for it or it was on the device."""
        self.stats["stale_replaced"] += 1
        was_on_device = entry.slot is not None
        del self._entries[adapter_id]
        self._retire(adapter_id, entry)
        # Requests in the engine move to the new entry (their unwatch lands there); if the adapter was removed,
        # that fetch fails them with the store's answer.
        if entry.num_waiting > 0 or (refetch and was_on_device):
            self._start_fetch(adapter_id).num_waiting = entry.num_waiting
