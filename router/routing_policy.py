"""Replica choice policies (pure, no Ray): rank-aware table sampling, random, adapter affinity.

The names and the target-rank logic are the simulator's too (lorafleet.placement.policies, RoutingTable.sample).
A policy turns (adapter id, live replicas, routing table) into tiers of replicas, most preferred first;
Ray Serve sends the request to the least-queued replica with room in the first tier that has one. The
fallback tiers are the same for every policy: replicas already holding the adapter (least queued first),
then every other live replica. Dead replicas never appear: Serve drops them from the candidates.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from lorafleet.placement.policies import affinity_rank, random_rank
from lorafleet.placement.routing_table import RoutingTable

Tiers = list[list["ReplicaView"]]


@dataclass(slots=True)
class ReplicaView:
    """What routing knows of a live replica: stable rank (None until its first stats report), load, residency."""

    rank: int | None
    queue_len: int = 0
    resident: frozenset[str] = frozenset()
    replica: Any = field(default=None, repr=False)


class RoutingPolicy(ABC):
    """Base of replica choice policies; subclasses register in POLICIES by `name`."""

    name: str

    def choose(self, adapter_id: str | None, replicas: list[ReplicaView], table: RoutingTable | None,
               rng: random.Random) -> Tiers:
        """Tiers: the target rank; then replicas holding the adapter; then the rest (each least queued first).
        One sort and one pass over the replicas per request."""
        if not replicas:
            return []
        ordered = sorted(replicas, key=_queue_len)
        if not adapter_id:  # the base model: every replica serves it equally well
            return [ordered]
        target = self.target(adapter_id, replicas, table, rng)
        first: list[ReplicaView] = []
        holders: list[ReplicaView] = []
        others: list[ReplicaView] = []
        for r in ordered:
            if target is not None and r.rank == target:
                first.append(r)
            elif adapter_id in r.resident:
                holders.append(r)
            else:
                others.append(r)
        return [tier for tier in (first, holders, others) if tier]

    @abstractmethod
    def target(self, adapter_id: str, replicas: list[ReplicaView], table: RoutingTable | None,
               rng: random.Random) -> int | None:
        """Preferred replica rank for this request (None = no preference)."""


_queue_len = attrgetter("queue_len")


def _live_ranks(replicas: list[ReplicaView]) -> list[int]:
    return sorted(r.rank for r in replicas if r.rank is not None)


class RankAwarePolicy(RoutingPolicy):
    """LoRAServe: sample the solver's probabilistic table; adapters not in it use its consistent-hash default."""

    name = "rank-aware"

    def target(self, adapter_id, replicas, table, rng):
        if table is None:   # none published yet: the affinity choice
            return affinity_rank(adapter_id, _live_ranks(replicas))
        return table.sample(adapter_id, rng)


class RandomPolicy(RoutingPolicy):
    """Uniformly random live replica (a baseline for load tests)."""

    name = "random"

    def target(self, adapter_id, replicas, table, rng):
        return random_rank(_live_ranks(replicas), rng)


class AffinityPolicy(RoutingPolicy):
    """Consistent hash of the adapter id over live replica ranks (adapter locality, no rank awareness)."""

    name = "affinity"

    def target(self, adapter_id, replicas, table, rng):
        return affinity_rank(adapter_id, _live_ranks(replicas))


POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (RankAwarePolicy, RandomPolicy, AffinityPolicy)}
