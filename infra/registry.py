"""Adapter registry in Redis: id → current version record, version history, blob references, change events.

Keys under `{prefix}:adapters:` — registry (hash id → current record JSON), versions:{id} (hash version →
record JSON), seq:{id} (last allocated version), deleted (hash id → tombstone JSON), refs:{sha256} (set of
'id@version' using a blob), purging (zset sha256 → time), epoch (purge counter), marker (present while the
registry is known complete, see `registry_recovery`), recovery_lock (held by the process rebuilding it),
rebuilt (present for a few seconds after a rebuild); channel `events`.
Per-adapter demand counters live beside it in `lorafleet.infra.demand` under the same prefix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lorafleet.infra import registry_lua
from lorafleet.infra.adapter_ids import validate_adapter_id
from lorafleet.infra.errors import AdapterNotFound, StoreUnavailable, VersionConflict
from lorafleet.infra.redis_conn import unavailable_as_error
from lorafleet.infra.version_record import VersionRecord

# A 'purging' mark older than this is left over from a crashed purge and no longer blocks pushes.
PURGE_GRACE_S = 60.0


class PurgeRace(Exception):
    """A purge may have deleted blobs this push relies on; write the blobs again and retry the register."""


class RegistryLost(Exception):
    """The registry has no marker (Redis restarted empty): rebuild it from the object store, then retry."""


class Registry:
    """Atomic registry operations (one Lua script each) on a redis-py client (binary replies)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self.base = f"{prefix}:adapters"
        self.channel = f"{self.base}:events"
        self.registry_key = f"{self.base}:registry"
        self.deleted_key = f"{self.base}:deleted"
        self.epoch_key = f"{self.base}:epoch"
        self.purging_key = f"{self.base}:purging"
        self.refs_prefix = f"{self.base}:refs:"
        self.marker_key = f"{self.base}:marker"
        self.lock_key = f"{self.base}:recovery_lock"
        self.rebuilt_key = f"{self.base}:rebuilt"
        self.num_unreachable = 0  # calls that found Redis unreachable
        self._allocate = client.register_script(registry_lua.ALLOCATE)
        self._register = client.register_script(registry_lua.REGISTER)
        self._remove = client.register_script(registry_lua.REMOVE)
        self._begin_purge = client.register_script(registry_lua.BEGIN_PURGE)
        self._restore = client.register_script(registry_lua.RESTORE)
        self._raise_seq = client.register_script(registry_lua.RAISE_SEQ)
        self._finish_recovery = client.register_script(registry_lua.FINISH_RECOVERY)
        self._keep_lock = client.register_script(registry_lua.KEEP_LOCK)
        self._release_lock = client.register_script(registry_lua.RELEASE_LOCK)

    def versions_key(self, adapter_id: str) -> str:
        return f"{self.base}:versions:{adapter_id}"

    def seq_key(self, adapter_id: str) -> str:
        return f"{self.base}:seq:{adapter_id}"

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            with unavailable_as_error(self.redis, f"adapter registry ({what})"):
                yield
        except StoreUnavailable:
            self.num_unreachable += 1  # Redis may come back empty: recovery checks the marker at the next miss
            raise

    # --- push -----------------------------------------------------------------------------------------
    def allocate_version(self, adapter_id: str, floor: int = 0) -> int:
        """A fresh version number for adapter_id, greater than `floor` and every number handed out before."""
        validate_adapter_id(adapter_id)
        with self._guard(f"allocate a version of '{adapter_id}'"):
            return int(self._allocate(keys=[self.seq_key(adapter_id)], args=[floor]))

    def purge_epoch(self) -> bytes:
        """Read before writing blobs; register() refuses if a purge started since (it may have deleted them)."""
        with self._guard("read the purge epoch"):
            return self.redis.get(self.epoch_key) or b"0"

    def register(self, record: VersionRecord, epoch: bytes) -> None:
        """Make `record` the current version (atomic with its history entry, blob refs and 'updated' event).

        VersionConflict if a newer version (or a delete of one) got there first; PurgeRace to retry;
        RegistryLost if the registry has no marker (a version registered into a lost registry would hide the loss).
        """
        event = json.dumps({"event": "updated", "adapter_id": record.adapter_id, "version": record.version})
        shas = sorted({sha for sha, _ in record.files.values()})
        keys = [self.registry_key, self.versions_key(record.adapter_id), self.deleted_key, self.epoch_key,
                self.purging_key, self.marker_key]
        args = [record.adapter_id, record.version, record.to_json(), epoch, self.channel, event, time.time(),
                PURGE_GRACE_S, self.refs_prefix, *shas]
        with self._guard(f"register '{record.adapter_id}'"):
            status, *detail = self._register(keys=keys, args=args)
        if status == b"lost":
            raise RegistryLost(f"adapter registry under '{self.prefix}' has no marker (Redis lost its data?)")
        if status == b"retry":
            raise PurgeRace(detail[0].decode())
        if status == b"conflict":
            raise VersionConflict(
                f"adapter '{record.adapter_id}': version {detail[0].decode()} was pushed or removed concurrently; "
                f"version {record.version} was not made current (push again to replace it)"
            )

    # --- read -----------------------------------------------------------------------------------------
    def current(self, adapter_id: str) -> VersionRecord:
        """The current record; AdapterNotFound (saying so if it was removed) otherwise."""
        validate_adapter_id(adapter_id)
        with self._guard(f"look up '{adapter_id}'"):
            raw = self.redis.hget(self.registry_key, adapter_id)
            tomb = None if raw is not None else self.redis.hget(self.deleted_key, adapter_id)
        if raw is not None:
            return VersionRecord.from_json(raw)
        if tomb is not None:
            info = json.loads(tomb)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["deleted"]))
            raise AdapterNotFound(f"adapter '{adapter_id}' was removed at {when} (version {info['version']})")
        raise AdapterNotFound(f"adapter '{adapter_id}' not found")

    def current_many(self, adapter_ids: list[str]) -> dict[str, VersionRecord | None]:
        """Current records of many ids in one HMGET; None for ids not registered (or removed)."""
        for adapter_id in adapter_ids:
            validate_adapter_id(adapter_id)
        if not adapter_ids:
            return {}
        with self._guard(f"look up {len(adapter_ids)} adapters"):
            raw = self.redis.hmget(self.registry_key, adapter_ids)
        return {a: None if r is None else VersionRecord.from_json(r) for a, r in zip(adapter_ids, raw, strict=True)}

    def get_version(self, adapter_id: str, version: int) -> VersionRecord:
        validate_adapter_id(adapter_id)
        with self._guard(f"look up '{adapter_id}' version {version}"):
            raw = self.redis.hget(self.versions_key(adapter_id), str(version))
        if raw is None:
            raise AdapterNotFound(f"adapter '{adapter_id}' has no version {version}")
        return VersionRecord.from_json(raw)

    def list_current(self) -> list[VersionRecord]:
        """Current records of every live adapter, sorted by id (one HGETALL however many adapters)."""
        with self._guard("list adapters"):
            raw = self.redis.hgetall(self.registry_key)
        return sorted((VersionRecord.from_json(v) for v in raw.values()), key=lambda r: r.adapter_id)

    def list_removed(self) -> dict[str, dict]:
        """Soft-deleted adapters: id → {'version': last version, 'deleted': unix time}."""
        with self._guard("list removed adapters"):
            raw = self.redis.hgetall(self.deleted_key)
        return {k.decode(): json.loads(v) for k, v in sorted(raw.items())}

    def versions(self, adapter_id: str) -> list[VersionRecord]:
        """Every version kept for adapter_id (live or soft-deleted), oldest first; AdapterNotFound if none."""
        validate_adapter_id(adapter_id)
        with self._guard(f"list versions of '{adapter_id}'"):
            raw = self.redis.hgetall(self.versions_key(adapter_id))
        if not raw:
            raise AdapterNotFound(f"adapter '{adapter_id}' not found")
        return sorted((VersionRecord.from_json(v) for v in raw.values()), key=lambda r: r.version)

    # --- delete ---------------------------------------------------------------------------------------
    def remove(self, adapter_id: str) -> dict:
        """Soft delete: the adapter stops being served, its versions and blobs stay. Returns the tombstone."""
        validate_adapter_id(adapter_id)
        with self._guard(f"remove '{adapter_id}'"):
            keys, args = [self.registry_key, self.deleted_key], [adapter_id, time.time(), self.channel]
            tomb = self._remove(keys=keys, args=args)
        if tomb is None:
            self.current(adapter_id)  # raises the right AdapterNotFound
            raise AdapterNotFound(f"adapter '{adapter_id}' not found")
        return json.loads(tomb)

    def begin_purge(self, adapter_id: str) -> list[str]:
        """Forget adapter_id entirely; returns blob hashes nothing references any more (delete them, then
        call end_purge). AdapterNotFound if the registry has never heard of it."""
        validate_adapter_id(adapter_id)
        keys = [self.registry_key, self.versions_key(adapter_id), self.deleted_key, self.epoch_key, self.purging_key]
        with self._guard(f"purge '{adapter_id}'"):
            freed = self._begin_purge(keys=keys, args=[adapter_id, time.time(), self.channel, self.refs_prefix])
        if freed is None:
            raise AdapterNotFound(f"adapter '{adapter_id}' not found")
        return sorted(sha.decode() for sha in freed)

    def end_purge(self, shas: list[str]) -> None:
        if shas:
            with self._guard("finish a purge"):
                self.redis.zrem(self.purging_key, *shas)

    def num_refs(self, sha256: str) -> int:
        with self._guard("count blob references"):
            return int(self.redis.scard(self.refs_prefix + sha256))

    # --- recovery -------------------------------------------------------------------------------------
    def restore(self, adapter_id: str, records: list[VersionRecord], tombstone: dict | None) -> str:
        """Re-add versions (from the object store's manifests) that Redis lost; the state after: 'live' / 'deleted'."""
        validate_adapter_id(adapter_id)
        keys = [self.registry_key, self.versions_key(adapter_id), self.deleted_key, self.seq_key(adapter_id)]
        args: list[Any] = [adapter_id, self.channel, self.refs_prefix, json.dumps(tombstone) if tombstone else ""]
        for record in records:
            args += [record.version, record.to_json()]
        with self._guard(f"restore '{adapter_id}'"):
            return self._restore(keys=keys, args=args).decode()

    def raise_seq(self, adapter_id: str, floor: int) -> None:
        """Never hand out a version number <= floor again (numbers seen in manifests a rebuild could not read)."""
        with self._guard(f"raise the version counter of '{adapter_id}'"):
            self._raise_seq(keys=[self.seq_key(adapter_id)], args=[floor])

    def marker_state(self) -> str:
        """'lost' (no marker), 'rebuilt' (marker set by a rebuild in the last seconds) or 'intact'; one round
        trip (two EXISTS). See `registry_recovery` for the rule."""
        with self._guard("check the registry marker"):
            has_marker, is_rebuilt = self.redis.pipeline(transaction=False).exists(self.marker_key).exists(
                self.rebuilt_key).execute()
        return "lost" if not has_marker else "rebuilt" if is_rebuilt else "intact"

    def lock_recovery(self, token: str, ttl_s: float) -> bool:
        """Take the cluster-wide rebuild lock (SET NX PX); False if another process holds it."""
        with self._guard("take the registry recovery lock"):
            return bool(self.redis.set(self.lock_key, token, nx=True, px=int(ttl_s * 1000)))

    def keep_recovery_lock(self, token: str, ttl_s: float) -> bool:
        with self._guard("extend the registry recovery lock"):
            return bool(self._keep_lock(keys=[self.lock_key], args=[token, int(ttl_s * 1000)]))

    def unlock_recovery(self, token: str) -> None:
        with self._guard("release the registry recovery lock"):
            self._release_lock(keys=[self.lock_key], args=[token])

    def finish_recovery(self, token: str, note: str, rebuilt_s: float = 0.0) -> bool:
        """Set the marker (and 'rebuilt' for rebuilt_s) and release the lock, if `token` still holds it;
        False (nothing written) if not."""
        keys = [self.lock_key, self.marker_key, self.rebuilt_key]
        with self._guard("mark the registry complete"):
            return bool(self._finish_recovery(keys=keys, args=[token, note, int(rebuilt_s * 1000)]))

    def ping(self) -> None:
        with self._guard("ping"):
            if not self.redis.ping():
                raise StoreUnavailable("adapter registry: Redis did not answer PING")
