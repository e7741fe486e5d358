"""Host-memory LRU of adapter bundles on a replica, bounded in bytes (the tier in front of Redis)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from lorafleet.infra.version_record import VersionRecord


@dataclass(slots=True)
class HostEntry:
    """One adapter's current files; `stamp` = event-listener epoch when last checked against the registry."""

    record: VersionRecord
    files: dict[str, bytes] = field(repr=False)
    stamp: int | None = None

    @property
    def num_bytes(self) -> int:
        return sum(len(data) for data in self.files.values())


class HostCache:
    """adapter_id → HostEntry, least recently used evicted first once over `max_bytes` (0 disables it)."""

    def __init__(self, max_bytes: int) -> None:
        assert max_bytes >= 0, "max_bytes must be >= 0"
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, HostEntry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._entries

    def get(self, adapter_id: str) -> HostEntry | None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None:
                self._entries.move_to_end(adapter_id)
            return entry

    def can_put(self, num_bytes: int) -> bool:
        return num_bytes <= self.max_bytes

    def put(self, adapter_id: str, entry: HostEntry) -> bool:
        """Insert or replace; False (and nothing cached) if the entry alone exceeds the budget."""
        size = entry.num_bytes
        if not self.can_put(size):
            self.pop(adapter_id)
            return False
        with self._lock:
            old = self._entries.pop(adapter_id, None)
            self.num_bytes -= old.num_bytes if old is not None else 0
            self._entries[adapter_id] = entry
            self.num_bytes += size
            while self.num_bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.num_bytes -= evicted.num_bytes
            assert self.num_bytes >= 0, "host cache accounting went negative"
        return True

    def pop(self, adapter_id: str) -> HostEntry | None:
        with self._lock:
            entry = self._entries.pop(adapter_id, None)
            if entry is not None:
                self.num_bytes -= entry.num_bytes
            return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.num_bytes = 0
