"""RegistryRecovery: notice that Redis lost the adapter registry and rebuild it from the object store, once.

The rule: the registry's marker key (`{prefix}:adapters:marker`) exists only while the registry is known to
hold everything the object store's manifests describe. Only two things write it, and both hold the rebuild lock:
a reindex that ran to the end, and a check that found no manifest or tombstone at all (a fresh store, or one
whose adapters were all purged). So, on a registry miss:
  marker present                          → the miss is real (AdapterNotFound); nothing else is read;
  marker missing, `manifests/` empty      → nothing to lose: write the marker, no reindex;
  marker missing, manifests or tombstones → Redis lost the registry: reindex, then write the marker.
Soft-removed adapters keep their manifests and a tombstone, so a store whose adapters were all removed still
counts as "has manifests", and its reindex restores them as removed. Pushes refuse to register while the
marker is missing (RegistryLost), so a push into an emptied Redis cannot make a lost registry look whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING

from lorafleet.infra.adapter_ids import validate_adapter_id
from lorafleet.infra.errors import AdapterCorrupt, InvalidAdapterId, ObjectNotFound, StoreUnavailable
from lorafleet.infra.object_store import manifest_key
from lorafleet.infra.single_flight import SingleFlight
from lorafleet.infra.version_record import VersionRecord

if TYPE_CHECKING:
    from lorafleet.infra.object_store import ObjectStore
    from lorafleet.infra.registry import Registry

log = logging.getLogger(__name__)

TOMBSTONE = "tombstone.json"
PROBE_KEY = "manifests/.probe"  # never written: reading it tells "reachable and empty" from "not there"
_MANIFEST_NAME = re.compile(r"(\d{10})\.json")
# After a miss the marker is checked at most this often per process: a stream of requests for unknown ids
# costs one marker check per second. A process that saw Redis unreachable checks at its next miss; one that did
# not notice the restart, within this delay.
CHECK_INTERVAL_S = 1.0
# A rebuilding process that dies holds the lock at most this long; a live one extends it as it goes.
LOCK_TTL_S = 30.0
# A miss that finds another process rebuilding waits this long for it, then answers StoreUnavailable (503).
WAIT_S = 5.0
POLL_S = 0.05
# For this long after a rebuild, a process whose lookup missed during it is told to look again.
REBUILT_S = 10.0


def manifest_name(version: int) -> str:
    return f"{version:010d}.json"  # zero-padded: key order is version order


def manifest_version(key: str) -> int | None:
    """The version a manifest key names, None for a tombstone or a foreign file."""
    match = _MANIFEST_NAME.fullmatch(key.rsplit("/", 1)[-1])
    return int(match[1]) if match else None


class RegistryRecovery:
    """Detects a lost registry after a miss and rebuilds it: single-flight in the process (threads share one
    check), and across processes through a Redis lock (SET NX PX), so N routers and replicas reindex once."""

    def __init__(self, registry: Registry, objects: ObjectStore) -> None:
        self.registry = registry
        self.objects = objects
        self.num_recoveries = 0  # reindexes this process ran because the registry was lost
        self._flight = SingleFlight()
        self._next_check_at = 0.0
        self._was_rebuilt = False  # what the last check found, repeated until the next one
        self._error: str | None = None
        self._num_unreachable_seen = 0  # registry.num_unreachable at the last check

    def recover_if_lost(self) -> bool:
        """After a registry miss: True if the registry had been lost and is rebuilt now (look again).

        Rate-limited: between checks, answers what the last one found (True right after a rebuild, so a lookup
        that missed during the rebuild looks again; StoreUnavailable again if the last check failed). A Redis
        outage seen since the last check (Redis may be back empty) lifts the limit."""
        is_outage_seen = self.registry.num_unreachable != self._num_unreachable_seen
        if time.monotonic() < self._next_check_at and not is_outage_seen:
            if self._error is not None:
                raise StoreUnavailable(self._error)
            return self._was_rebuilt
        return self.ensure()

    def ensure(self, *, is_push: bool = False) -> bool:
        """Make sure the registry is complete (no rate limit); True if it was rebuilt. is_push: the caller is
        about to write to the object store, so an empty one that does not answer reads yet (a local directory
        not created yet) counts as empty."""
        # Pushes and reads do not share a flight: they differ on an empty store that does not answer reads yet.
        was_rebuilt, _ = self._flight.do(f"ensure:{is_push}", lambda: self._ensure(is_push))
        return was_rebuilt

    def _ensure(self, is_push: bool) -> bool:
        # Redis down here raises and changes nothing: lookups fail before they can miss while it is down.
        self._num_unreachable_seen = self.registry.num_unreachable
        state = self.registry.marker_state()
        self._error, self._was_rebuilt = None, state == "rebuilt"
        try:
            if state == "lost":
                self._was_rebuilt = self._rebuild(is_push)
        except StoreUnavailable as exc:  # object store down, or another process still rebuilding: answered
            self._error = str(exc)       # again until the next check, which is when it is tried again
            raise
        finally:
            self._next_check_at = time.monotonic() + CHECK_INTERVAL_S
        return self._was_rebuilt

    def _rebuild(self, is_push: bool) -> bool:
        deadline = time.monotonic() + WAIT_S
        while True:
            token = uuid.uuid4().hex
            if self.registry.lock_recovery(token, LOCK_TTL_S):
                try:
                    outcome = self._rebuild_locked(token, is_push)
                except StoreUnavailable as exc:
                    raise StoreUnavailable(f"adapter registry under '{self.registry.prefix}' has no marker (Redis "
                                           f"lost it?) and cannot be rebuilt yet: {exc}") from None
                finally:
                    with contextlib.suppress(StoreUnavailable):  # already released if finished
                        self.registry.unlock_recovery(token)
                if outcome is not None:
                    return outcome
            elif self.registry.marker_state() != "lost":  # another process rebuilt it meanwhile
                return True
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"adapter registry under '{self.registry.prefix}': being rebuilt from the "
                                       f"object store by another process; retry shortly")
            time.sleep(POLL_S)

    def _rebuild_locked(self, token: str, is_push: bool) -> bool | None:
        """With the lock: reindex (True), or mark an empty store (False); None if the lock was lost meanwhile."""
        if self.registry.marker_state() != "lost":  # the last holder finished just before we took the lock
            return True
        keys = self.objects.list("manifests/")
        if not keys and not is_push and not self._is_readable():
            return False  # a local store whose directory is missing lists as empty: do not mark, look again later
        if keys:
            counts = self._reindex(keys, token)
            self.num_recoveries += 1
            log.warning("adapter registry under '%s' was lost (no marker, %d manifest files): rebuilt from %s: %s",
                        self.registry.prefix, len(keys), self.objects.url, counts)
        note = json.dumps({"at": time.time(), "by": "reindex" if keys else "empty object store"})
        return bool(keys) if self.registry.finish_recovery(token, note, REBUILT_S if keys else 0.0) else None

    def _is_readable(self) -> bool:
        try:
            self.objects.get(PROBE_KEY)
        except ObjectNotFound:
            return True
        except StoreUnavailable:
            return False
        return True

    def reindex(self) -> dict[str, int]:
        """Rebuild lost registry entries from the object store's manifests, by hand; marks the registry complete
        unless another process holds the rebuild lock (that one marks it). Idempotent."""
        token = uuid.uuid4().hex
        is_locked = self.registry.lock_recovery(token, LOCK_TTL_S)
        try:
            counts = self._reindex(self.objects.list("manifests/"), token if is_locked else None)
            if is_locked:
                note = json.dumps({"at": time.time(), "by": "reindex (by hand)"})
                self.registry.finish_recovery(token, note, REBUILT_S)
        finally:
            if is_locked:
                with contextlib.suppress(StoreUnavailable):
                    self.registry.unlock_recovery(token)
        return counts

    def _read_manifest(self, key: str, parse):
        """parse(the object at key), or None for one purged since the listing or damaged (logged and skipped: one
        bad manifest must not stop the rebuild of every other adapter). StoreUnavailable still raises."""
        try:
            return parse(self.objects.get(key))
        except ObjectNotFound:
            return None
        except (ValueError, KeyError, TypeError, AdapterCorrupt) as exc:   # JSONDecodeError is a ValueError
            log.warning("reindex: skipping damaged manifest %s (%s: %s)", key, exc.__class__.__name__, exc)
            return None

    def _reindex(self, keys: list[str], token: str | None) -> dict[str, int]:
        """Restore every adapter the manifest keys describe; returns how many are live / deleted afterwards and
        how many versions were read. Extends the lock `token` as it goes (a big S3 store takes a while)."""
        by_id: dict[str, dict[str, list[str]]] = {}
        for key in keys:
            _, adapter_id, name = key.split("/", 2)
            kind = "tombstone" if name == TOMBSTONE else "versions" if manifest_version(key) else None
            if kind is not None:
                by_id.setdefault(adapter_id, {"versions": [], "tombstone": []})[kind].append(key)
        counts = {"live": 0, "deleted": 0, "num_versions": 0}
        kept_at = time.monotonic()
        for adapter_id, found in sorted(by_id.items()):
            try:
                validate_adapter_id(adapter_id)
            except InvalidAdapterId:
                log.warning("reindex: skipping %s (not an adapter id)", manifest_key(adapter_id, ""))
                continue
            records = [r for r in (self._read_manifest(k, VersionRecord.from_json) for k in found["versions"]) if r]
            tomb = self._read_manifest(found["tombstone"][0], json.loads) if found["tombstone"] else None
            if not records and tomb is None:
                continue   # nothing readable left (purged meanwhile, or every manifest damaged)
            counts[self.registry.restore(adapter_id, records, tomb)] += 1
            top = max((manifest_version(k) or 0 for k in found["versions"]), default=0)
            if top > max((r.version for r in records), default=0):   # a damaged manifest held the newest number
                self.registry.raise_seq(adapter_id, top)
            counts["num_versions"] += len(records)
            if token is not None and time.monotonic() - kept_at > LOCK_TTL_S / 3:
                self.registry.keep_recovery_lock(token, LOCK_TTL_S)
                kept_at = time.monotonic()
        return counts
