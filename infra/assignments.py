"""Which adapters the published routing table assigns to each replica rank, kept in Redis beside the table.

`RoutingTableStore.publish` (placement) writes the hash `{prefix}:placement:assigned` in the same transaction as
the table: field "version" = the table version, field "<rank>" = JSON list of [adapter id, bytes] for the adapters
with a share on that rank (largest share first), then the registered adapters outside the table whose
consistent-hash home the rank is. A replica reads only its own field (AssignmentReader) and prefetches those
adapters, in that order, as far as its host tier holds them. Placement writes and replicas read through this
module, so replicas never parse placement's table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def assigned_key(prefix: str) -> str:
    return f"{prefix}:placement:assigned"


def per_rank(entries: Mapping[str, Sequence[tuple[int, float]]], num_replicas: int,
             homes: Mapping[str, int] | None = None, sizes: Mapping[str, int] | None = None) -> dict[str, str]:
    """Hash fields for a table: {"<rank>": JSON [[adapter id, bytes], ...]} for every rank — the table's adapters
    with a share there, largest share first, then (`homes`) registered adapters outside the table whose
    consistent-hash home it is, where requests for them go. `sizes`: adapter bytes (0 when unknown)."""
    sizes = sizes or {}
    shares: dict[int, list[tuple[float, str]]] = {rank: [] for rank in range(num_replicas)}
    for adapter_id, entry in entries.items():
        for rank, p in entry:
            if p > 0 and rank in shares:
                shares[rank].append((p, adapter_id))
    for adapter_id, rank in sorted((homes or {}).items()):
        if adapter_id not in entries and rank in shares:
            shares[rank].append((0.0, adapter_id))
    return {str(rank): json.dumps([[a, int(sizes.get(a, 0))] for _, a in sorted(items, key=lambda x: (-x[0], x[1]))])
            for rank, items in shares.items()}


class AssignmentReader:
    """This replica's assignment: `poll()` returns (version, adapter ids) when the published table changed since
    the last poll, else None. The replica calls it from its own loop (ReplicaDeployment); Redis errors raise."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.redis, self.key = client, assigned_key(prefix)
        self.version = 0

    def poll(self, rank: int) -> tuple[int, list[tuple[str, int]]] | None:
        """(version, [(adapter id, bytes), ...] in priority order) of a table newer than the last poll, else None."""
        raw_version, raw_items = self.redis.hmget(self.key, ["version", str(rank)])
        version = int(raw_version) if raw_version is not None else 0
        if version == self.version:
            return None
        items = json.loads(raw_items) if raw_items is not None else []
        self.version = version
        return version, [(str(item[0]), int(item[1])) for item in items
                         if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                         and isinstance(item[1], int)]
