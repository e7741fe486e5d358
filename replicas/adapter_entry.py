"""One adapter's state in a replica's AdapterCache (loading / ready / failed, weights, device slot, pins)."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.infra.adapters import AdapterWeights
from lorafleet.replicas.scheduler import AdapterStatus


@dataclass(slots=True)
class AdapterEntry:
    status: AdapterStatus
    weights: AdapterWeights | None = None
    error: Exception | None = None
    version: str = ""
    is_from_path: bool = False  # registered with load(): events and resyncs of the source do not apply
    newer_than: str = ""       # an event announced this version while loading: a fetch of an older one is refetched
    slot: int | None = None
    num_pins: int = 0          # running requests using it on the device
    num_waiting: int = 0       # requests in the engine that named it (host copy kept while > 0)
    is_stale: bool = False     # replaced or unloaded while pinned: uninstall when the last pin goes


def is_older(version: str, than: str) -> bool:
    """Store versions are integers (compare them); other sources' versions only differ or not."""
    if version.isdigit() and than.isdigit():
        return int(version) < int(than)
    return version != than
