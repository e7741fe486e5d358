"""Placement over the live replica ranks only: the previous table compacted onto them, the solution put back.

Which ranks are alive comes from the replicas' heartbeats (`lorafleet.infra.heartbeats.ReplicaLiveness`). The
rebalancer leaves out ranks that beat once and stopped, so a replica that died and was not replaced (no resources
for a new one) loses its adapters at the next rebalance instead of keeping them in the table.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lorafleet.placement.routing_table import RoutingTable
from lorafleet.placement.solver import Placement


def compact_previous(previous: RoutingTable | None, live: list[int]) -> RoutingTable | None:
    """The previous table over the live ranks only, renumbered 0..len(live)-1 (shares on dead ranks dropped,
    the rest renormalised), for the solver's churn minimisation."""
    if previous is None:
        return None
    index = {rank: i for i, rank in enumerate(live)}
    entries = {}
    for adapter_id, entry in previous.entries.items():
        kept = [(index[rank], p) for rank, p in entry if rank in index and p > 0]
        total = sum(p for _, p in kept)
        if kept and total > 0:
            entries[adapter_id] = tuple((i, p / total) for i, p in kept)
    return RoutingTable(len(live), entries, version=previous.version, created_at=previous.created_at)


def expand_placement(placement: Placement, live: list[int], num_replicas: int) -> Placement:
    """A placement solved over len(live) compact replicas, put back on the physical ranks `live` of
    `num_replicas`: dead ranks get no adapter and zero load."""
    def spread(values: Any, empty: Any) -> tuple:
        out = [empty] * num_replicas
        for i, rank in enumerate(live):
            out[rank] = values[i]
        return tuple(out)

    table = placement.table
    entries = {a: tuple((live[i], p) for i, p in entry) for a, entry in table.entries.items()}
    meta = {**dict(table.meta), "live_ranks": list(live)}
    for key in ("replica_max_rank", "replica_tokens_per_s"):   # the solver's per-replica predictions
        if key in meta:
            meta[key] = list(spread(meta[key], 0))
    physical = RoutingTable(num_replicas, entries, version=table.version, created_at=table.created_at, meta=meta)
    return replace(placement, table=physical, replica_max_rank=spread(placement.replica_max_rank, 0),
                   replica_tokens_per_s=spread(placement.replica_tokens_per_s, 0.0),
                   replica_utilization=spread(placement.replica_utilization, 0.0),
                   replica_adapter_bytes=spread(placement.replica_adapter_bytes, 0),
                   replica_num_adapters=spread(placement.replica_num_adapters, 0),
                   permutation=tuple(live[i] for i in placement.permutation))
