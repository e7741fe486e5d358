"""Where an engine gets adapters it lacks: the AdapterSource interface and its local-directory form."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lorafleet.infra.adapter_files import read_adapter_dir
from lorafleet.infra.adapters import DEFAULT_MAX_BYTES, validate_adapter_id
from lorafleet.infra.errors import AdapterNotFound


@dataclass(frozen=True, slots=True)
class FetchedAdapter:
    """The files of one adapter version: {adapter_config.json: bytes, adapter_model.safetensors: bytes}."""

    adapter_id: str
    version: str
    files: dict[str, bytes] = field(repr=False)


class AdapterSource(Protocol):
    """Fetch an adapter's current version by id; AdapterNotFound if unknown, StoreUnavailable if unreachable.

    Implementations must be safe to call from several threads at once.
    """

    def fetch(self, adapter_id: str) -> FetchedAdapter: ...


class LocalDirSource:
    """Adapters as sub-directories `root/<adapter_id>/` (PEFT layout); version = sha256 of the weights file."""

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def fetch(self, adapter_id: str) -> FetchedAdapter:
        validate_adapter_id(adapter_id)
        path = self.root / adapter_id
        if not path.is_dir():
            raise AdapterNotFound(f"adapter '{adapter_id}' not found in {self.root}")
        files = read_adapter_dir(path, self.max_bytes)
        version = hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()[:16]
        return FetchedAdapter(adapter_id, version, files)
