"""The placement half of the AdapterCache: act on the adapters the published routing table assigns to this replica
(prefetch into the host tier, install on the device as room allows, demote the ones no longer assigned)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lorafleet.infra.adapter_ids import is_valid_adapter_id
from lorafleet.replicas.adapter_entry import AdapterEntry

PREFETCH_FILL = 0.9   # prefetch fills the host tier up to this share, leaving room for requests' own fetches


class AssignmentMixin:
    """Part of AdapterCache (its state below)."""

    _lock: threading.RLock
    _entries: dict[str, AdapterEntry]
    _assigned: dict[str, None]
    _is_install_pending: bool
    _device_lru: OrderedDict[str, None]
    _host_lru: OrderedDict[str, None]
    pools: Any
    stats: dict[str, int]
    host_cache_max_bytes: int

    if TYPE_CHECKING:   # AdapterCache's own methods
        def prefetch(self, adapter_ids: Iterable[str]) -> int: ...

        def _uninstall_entry(self, entry: AdapterEntry) -> None: ...

    def assign(self, adapter_ids: Iterable[str], sizes: Mapping[str, int] | None = None) -> int:
        """The published routing table assigns these adapters to this replica, in priority order (its own adapters
        by share, then those it is the consistent-hash home of): fetch the missing ones into the host tier now, as
        far as the tier holds them (`sizes`: bytes per adapter, when known); install_assigned() puts them on the
        device as room allows. Adapters no longer assigned are demoted lazily: nothing is dropped now, they are the
        first to go when room is needed. Ids that are not valid adapter ids are ignored. Returns fetches started."""
        ids = [a for a in adapter_ids if is_valid_adapter_id(a)]
        sizes = sizes or {}
        with self._lock:
            for adapter_id in [a for a in self._assigned if a not in set(ids)]:
                for lru in (self._device_lru, self._host_lru):   # oldest end = evicted first
                    if adapter_id in lru:
                        lru.move_to_end(adapter_id, last=False)
            self._assigned = dict.fromkeys(ids)
            self._is_install_pending = True
            budget, wanted = PREFETCH_FILL * self.host_cache_max_bytes, []
            for adapter_id in ids:   # what fits, in priority order; held adapters count too
                budget -= sizes.get(adapter_id, 0)
                if budget < 0:
                    break
                if adapter_id not in self._entries:
                    wanted.append(adapter_id)
            return self.prefetch(wanted)

    def install_assigned(self) -> int:
        """Install ready assigned adapters that are not on the device, largest share first, into free pool rows
        or rows held by unpinned adapters that are not assigned: never evicts a pinned or an assigned adapter
        (prefetch is the lowest priority). May compact the pools: the engine thread only, between steps."""
        if not self._is_install_pending:
            return 0
        num_installed = 0
        with self._lock:
            self._is_install_pending = False
            for adapter_id in self._assigned:
                entry = self._entries.get(adapter_id)
                if entry is None or entry.status != "ready" or entry.slot is not None or entry.weights is None:
                    continue
                if not self._make_room(entry.weights.max_rank):
                    self._is_install_pending = True   # try again when room frees up
                    break
                entry.slot = self.pools.install(entry.weights)
                self._device_lru[adapter_id] = None   # resident and unpinned: evictable like any other
                self.stats["installs"] += 1
                self.stats["prefetch_installs"] += 1
                num_installed += 1
        return num_installed

    def _make_room(self, num_rows: int) -> bool:
        while not self.pools.can_install(num_rows):
            if self.pools.can_install_after_compaction(num_rows):
                self.pools.compact()
                self.stats["compactions"] += 1
                continue
            victim = next((a for a in self._device_lru if a not in self._assigned), None)
            if victim is None:
                return False
            del self._device_lru[victim]
            self._uninstall_entry(self._entries[victim])
            self.stats["evictions"] += 1
        return True
