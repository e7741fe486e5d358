"""AdapterStore: push (validate → blobs → register → publish), read, list, remove and reindex adapters.

The object store is the source of truth (blobs + one manifest per registered version + tombstones); Redis
holds the registry, the hot blob cache and the events. A registry Redis lost is rebuilt from the object store
on the next miss (`registry_recovery`), or by hand (reindex).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lorafleet.infra.errors import (
    AdapterNotFound,
    AdapterTooLarge,
    InvalidAdapter,
    StoreUnavailable,
)
from lorafleet.infra.hot_cache import HotCache
from lorafleet.infra.object_store import ObjectStore, manifest_key, open_object_store
from lorafleet.infra.redis_conn import connect
from lorafleet.infra.registry import PurgeRace, Registry, RegistryLost
from lorafleet.infra.registry_recovery import TOMBSTONE, RegistryRecovery, manifest_name, manifest_version
from lorafleet.infra.store_source import read_verified_blob
from lorafleet.infra.version_record import BUNDLE_FILES, VersionRecord

if TYPE_CHECKING:
    from lorafleet.infra.adapter_source import FetchedAdapter
    from lorafleet.infra.base_spec import BaseModelSpec
    from lorafleet.infra.config import Settings
log = logging.getLogger(__name__)

MAX_PUSH_ATTEMPTS = 20
T = TypeVar("T")


class AdapterStore:
    """One store shared by the cluster: object store + Redis registry + Redis hot cache (+ demand counters)."""

    def __init__(
        self, objects: ObjectStore, redis_client: Any, prefix: str, *,
        base: BaseModelSpec | str | Path | None = None, hot_cache_max_bytes: int = 512 * 2**20,
        max_rank: int = 128, max_bytes: int = 2**30,
    ) -> None:
        self.objects = objects
        self.redis = redis_client
        self.prefix = prefix
        self.registry = Registry(redis_client, prefix)
        self.recovery = RegistryRecovery(self.registry, objects)
        self.hot = HotCache(redis_client, prefix, hot_cache_max_bytes)
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self._base = base

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, base: str | Path | None = None) -> AdapterStore:
        """The store the settings describe; pushes validate against `base` (default: settings.model_dir)."""
        from lorafleet.infra.config import get_settings

        s = settings or get_settings()
        objects = open_object_store(s.store_url, s3_endpoint_url=s.s3_endpoint_url, timeout_s=s.store_timeout_s)
        return cls(objects, connect(s.redis_url, s.store_timeout_s), s.redis_prefix, base=base or s.model_dir,
                   hot_cache_max_bytes=s.hot_cache_max_bytes, max_rank=s.max_rank, max_bytes=s.max_adapter_bytes)

    def base_spec(self) -> BaseModelSpec:
        from lorafleet.infra.base_spec import BaseModelSpec

        if not isinstance(self._base, BaseModelSpec):
            if self._base is None:
                raise InvalidAdapter("no base model to validate against: set LORAFLEET_MODEL_DIR or pass --base")
            self._base = BaseModelSpec.from_model_dir(self._base)
        return self._base

    # --- push -----------------------------------------------------------------------------------------
    def push(
        self, adapter_id: str, adapter_dir: str | Path | None = None, *, files: Mapping[str, bytes] | None = None,
        owner: str | None = None, if_changed: bool = False,
    ) -> VersionRecord:
        """Validate, write blobs, register and publish a new version of adapter_id; returns its record.
        With `if_changed`, files equal (sha256) to the current version's push nothing and return that record.

        Any failure leaves the previous version current. Concurrent pushes of one id: each gets its own
        version number; one that finds a newer version already registered fails with VersionConflict.
        """
        from lorafleet.infra.adapter_files import read_adapter_dir
        from lorafleet.infra.adapters import load_adapter_files, validate_adapter_id

        validate_adapter_id(adapter_id)
        assert (adapter_dir is None) != (files is None), "pass adapter_dir or files"
        source = str(adapter_dir) if adapter_dir is not None else f"<push {adapter_id}>"
        if files is None:
            files = read_adapter_dir(adapter_dir, self.max_bytes)
        unexpected = sorted(set(files) - set(BUNDLE_FILES))
        if unexpected:
            expected = " and ".join(BUNDLE_FILES)
            raise InvalidAdapter(f"{source}/{unexpected[0]}: unexpected file; an adapter holds {expected}")
        files = {name: bytes(files[name]) for name in BUNDLE_FILES if name in files}
        if if_changed:
            current = self._current_or_none(adapter_id)
            digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
            if current is not None and {name: sha for name, (sha, _) in current.files.items()} == digests:
                return current
        num_bytes = sum(len(data) for data in files.values())
        if num_bytes > self.max_bytes:
            raise AdapterTooLarge(f"{source}: {num_bytes} bytes is over the limit of {self.max_bytes} bytes")
        weights = load_adapter_files(files, self.base_spec(), max_rank=self.max_rank, max_bytes=self.max_bytes,
                                     source=source)
        module_ranks: dict[str, int] = {}
        for (_, name), module in weights.modules.items():
            module_ranks[name] = max(module_ranks.get(name, 0), module.rank)
        version = self._allocate_version(adapter_id)
        created, owner = time.time(), owner or _default_owner()
        for attempt in range(MAX_PUSH_ATTEMPTS):
            epoch = self.registry.purge_epoch()  # before the blobs: a purge after this forces a retry
            blobs = {name: (self.objects.put_blob(data), len(data)) for name, data in files.items()}
            record = VersionRecord(adapter_id, version, weights.peft_type, weights.max_rank, module_ranks, blobs,
                                   created, owner)
            try:
                self.registry.register(record, epoch)
                break
            except PurgeRace as race:
                log.info("push '%s' v%d: %s; retrying", adapter_id, version, race)
                time.sleep(min(0.01 * 2**attempt, 0.5))
            except RegistryLost:  # Redis restarted empty since _allocate_version: rebuild, then register
                self.recovery.ensure(is_push=True)
        else:
            raise StoreUnavailable(f"push '{adapter_id}': purges kept deleting its blobs; try again")
        self._write_manifest(record)
        return record

    def _current_or_none(self, adapter_id: str) -> VersionRecord | None:
        try:
            return self.current(adapter_id)
        except AdapterNotFound:
            return None

    def _allocate_version(self, adapter_id: str) -> int:
        self.recovery.ensure(is_push=True)  # a lost registry is rebuilt first: numbering continues from manifests
        version = self.registry.allocate_version(adapter_id)
        if version == 1:  # a fresh counter: Redis may have lost it, so never reuse a number the store holds
            held = [manifest_version(k) or 0 for k in self.objects.list(manifest_key(adapter_id, ""))]
            if max(held, default=0) >= 1:
                version = self.registry.allocate_version(adapter_id, floor=max(held))
        return version

    def _write_manifest(self, record: VersionRecord) -> None:
        key = manifest_key(record.adapter_id, manifest_name(record.version))
        for attempt in range(3):
            try:
                self.objects.put(key, record.to_json().encode())
                return
            except StoreUnavailable:
                if attempt == 2:
                    raise StoreUnavailable(
                        f"adapter '{record.adapter_id}' version {record.version} is live, but its manifest could "
                        f"not be written to {self.objects.url}; run `lorafleet adapters reindex` later"
                    ) from None
                time.sleep(0.1)

    # --- read -----------------------------------------------------------------------------------------
    def _read(self, read: Callable[..., T], *args: Any) -> T:
        """read(*args), read again after an AdapterNotFound if the registry turned out lost and was rebuilt."""
        try:
            return read(*args)
        except AdapterNotFound:
            if not self.recovery.recover_if_lost():
                raise
        return read(*args)

    def current(self, adapter_id: str) -> VersionRecord:
        return self._read(self.registry.current, adapter_id)

    def current_many(self, adapter_ids: list[str]) -> dict[str, VersionRecord | None]:
        """Current records of many ids in one round trip (None: not registered); a lost registry is rebuilt first,
        so a Redis restart never reads as 'every adapter was removed'."""
        records = self.registry.current_many(adapter_ids)
        # A miss is checked against the registry's marker every time (not rate-limited like single lookups): a
        # replica's resync must never retire adapters because Redis lost its data a moment ago.
        if any(r is None for r in records.values()) and self.recovery.ensure():
            records = self.registry.current_many(adapter_ids)
        return records

    def get_version(self, adapter_id: str, version: int) -> VersionRecord:
        return self._read(self.registry.get_version, adapter_id, version)

    def list_current(self) -> list[VersionRecord]:
        records = self.registry.list_current()
        if not records and self.recovery.recover_if_lost():
            records = self.registry.list_current()
        return records

    def list_removed(self) -> dict[str, dict]:
        return self.registry.list_removed()

    def versions(self, adapter_id: str) -> list[VersionRecord]:
        return self._read(self.registry.versions, adapter_id)

    def get(self, adapter_id: str, version: int | None = None) -> FetchedAdapter:
        """Files of the current (or a given) version straight from the object store, hash-verified."""
        from lorafleet.infra.adapter_source import FetchedAdapter

        record = self.current(adapter_id) if version is None else self.get_version(adapter_id, version)
        files = {name: read_verified_blob(self.objects, record, name) for name in BUNDLE_FILES}
        return FetchedAdapter(adapter_id, str(record.version), files)

    def demand(self) -> Any:
        """Per-adapter demand counters (tokens, requests per window) in the same Redis under the same prefix."""
        from lorafleet.infra.demand import DemandCounters

        return DemandCounters(self.redis, self.prefix)

    # --- delete / recover -----------------------------------------------------------------------------
    def remove(self, adapter_id: str, *, purge: bool = False) -> dict:
        """Soft delete (stop serving; versions and blobs stay), or with purge: forget every version and delete
        the blobs no other version uses. Returns what was done."""
        if purge:
            return self._purge(adapter_id)
        current = self.current(adapter_id)
        tomb_key = manifest_key(adapter_id, TOMBSTONE)
        # Tombstone first: if Redis is lost later, reindex must not bring the adapter back.
        self.objects.put(tomb_key, json.dumps({"version": current.version, "deleted": time.time()}).encode())
        try:
            tomb = self.registry.remove(adapter_id)
        except StoreUnavailable:
            with contextlib.suppress(StoreUnavailable):  # not removed: reindex must not think it was
                self.objects.delete(tomb_key)
            raise
        if tomb["version"] != current.version:  # a push landed in between: the tombstone names what was removed
            self.objects.put(tomb_key, json.dumps(tomb).encode())
        return {"adapter_id": adapter_id, "removed_version": tomb["version"], "purged": False, "num_blobs_deleted": 0}

    def _purge(self, adapter_id: str) -> dict:
        self.versions(adapter_id)  # AdapterNotFound before touching the object store
        manifests = self.objects.list(manifest_key(adapter_id, ""))
        for key in manifests:  # manifests first: a purge cut short must not be undone by reindex
            self.objects.delete(key)
        freed = self.registry.begin_purge(adapter_id)
        for key in self.objects.list(manifest_key(adapter_id, "")):  # written by a push that raced the purge
            self.objects.delete(key)
        for sha in freed:
            self.objects.delete_blob(sha)
            try:
                self.hot.remove(sha)
            except StoreUnavailable:
                log.warning("purge '%s': hot cache entry %s not removed (Redis unreachable)", adapter_id, sha[:12])
        self.registry.end_purge(freed)
        return {"adapter_id": adapter_id, "removed_version": None, "purged": True, "num_blobs_deleted": len(freed)}

    def reindex(self) -> dict[str, int]:
        """Rebuild lost registry entries from the object store's manifests. Runs by itself after Redis restarts
        empty (on the next miss, see `registry_recovery`); this is the same rebuild by hand. Idempotent; returns
        how many adapters are live / deleted afterwards and how many versions were read."""
        return self.recovery.reindex()


def _default_owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
