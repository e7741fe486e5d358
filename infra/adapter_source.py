"""Where an engine gets adapters it lacks: the AdapterSource interfaces and the local-directory source.

A source only fetches bytes and answers which version is current; what a replica holds (host tier, device
pools) and when it drops a stale copy is decided by the replica's adapter cache, the one owner of residency.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from lorafleet.infra.adapter_files import read_adapter_dir
from lorafleet.infra.adapters import DEFAULT_MAX_BYTES, validate_adapter_id
from lorafleet.infra.errors import AdapterNotFound
from lorafleet.infra.events import AdapterEvent


@dataclass(frozen=True, slots=True)
class FetchedAdapter:
    """The files of one adapter version: {adapter_config.json: bytes, adapter_model.safetensors: bytes}.

    `digest` names the exact bytes (a sha256 over the files): a replica validates each digest once.
    """

    adapter_id: str
    version: str
    files: dict[str, bytes] = field(repr=False)
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", files_digest(self.files))


def files_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name} {hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return h.hexdigest()


class Subscription(Protocol):
    """A live feed of AdapterEvents; close() stops it."""

    def close(self) -> None: ...


class AdapterSource(Protocol):
    """Fetch an adapter's current version by id; AdapterNotFound if unknown, StoreUnavailable if unreachable.

    Implementations must be safe to call from several threads at once.
    """

    def fetch(self, adapter_id: str) -> FetchedAdapter: ...


@runtime_checkable
class VersionedSource(Protocol):
    """A source whose adapters change while a replica holds them (the shared store): it says which version is
    current now, and may push change events."""

    def fetch(self, adapter_id: str) -> FetchedAdapter: ...

    def current_versions(self, adapter_ids: Collection[str]) -> dict[str, str | None]:
        """adapter_id -> its current version (None: no longer exists). StoreUnavailable when it cannot tell."""
        ...

    def subscribe(self, callback: Callable[[AdapterEvent], None]) -> Subscription | None:
        """Deliver change events to `callback` (on another thread) until closed; None if the source has none.
        A 'resync' event means events may have been missed: recheck everything held."""
        ...


class LocalDirSource:
    """Adapters as sub-directories `root/<adapter_id>/` (PEFT layout); version = sha256 of the files."""

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def fetch(self, adapter_id: str) -> FetchedAdapter:
        validate_adapter_id(adapter_id)
        path = self.root / adapter_id
        if not path.is_dir():
            raise AdapterNotFound(f"adapter '{adapter_id}' not found in {self.root}")
        files = read_adapter_dir(path, self.max_bytes)
        digest = files_digest(files)
        return FetchedAdapter(adapter_id, digest[:16], files, digest)

    def current_versions(self, adapter_ids: Collection[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for adapter_id in adapter_ids:
            try:
                out[adapter_id] = self.fetch(adapter_id).version
            except AdapterNotFound:
                out[adapter_id] = None
        return out

    def subscribe(self, callback: Callable[[AdapterEvent], None]) -> Subscription | None:
        return None   # a directory has no change feed: the periodic resync notices edits
