"""Replica choice policies (pure, no Ray): rank-aware table sampling, random, adapter affinity.

A policy turns (adapter id, live replicas, routing table) into tiers of replicas, most preferred first;
Ray Serve sends the request to the least-queued replica with room in the first tier that has one. The
fallback tiers are the same for every policy: replicas already holding the adapter (least queued first),
then every other live replica. Dead replicas never appear: Serve drops them from the candidates.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from lorafleet.placement.routing_table import RoutingTable, jump_hash, stable_hash64

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
        if not replicas:
            return []
        if not adapter_id:  # the base model: every replica serves it equally well
            return [sorted(replicas, key=lambda r: r.queue_len)]
        target = self.target(adapter_id, replicas, table, rng)
        first = [r for r in replicas if r.rank is not None and r.rank == target]
        return [tier for tier in (first, *fallback_tiers(adapter_id, replicas, first)) if tier]

    @abstractmethod
    def target(self, adapter_id: str, replicas: list[ReplicaView], table: RoutingTable | None,
               rng: random.Random) -> int | None:
        """Preferred replica rank for this request (None = no preference)."""


def fallback_tiers(adapter_id: str, replicas: list[ReplicaView], exclude: list[ReplicaView]) -> Tiers:
    rest = [r for r in replicas if not any(r is e for e in exclude)]
    holders = sorted((r for r in rest if adapter_id in r.resident), key=lambda r: r.queue_len)
    others = sorted((r for r in rest if adapter_id not in r.resident), key=lambda r: r.queue_len)
    return [holders, others]


def _live_ranks(replicas: list[ReplicaView]) -> list[int]:
    return sorted(r.rank for r in replicas if r.rank is not None)


class RankAwarePolicy(RoutingPolicy):
    """LoRAServe: sample the solver's probabilistic table; adapters not in it use its consistent-hash default."""

    name = "rank-aware"

    def target(self, adapter_id, replicas, table, rng):
        if table is None:
            return AffinityPolicy().target(adapter_id, replicas, table, rng)
        return table.sample(adapter_id, rng)


class RandomPolicy(RoutingPolicy):
    """Uniformly random live replica (a baseline for load tests)."""

    name = "random"

    def target(self, adapter_id, replicas, table, rng):
        ranks = _live_ranks(replicas)
        return rng.choice(ranks) if ranks else None


class AffinityPolicy(RoutingPolicy):
    """Consistent hash of the adapter id over live replica ranks (adapter locality, no rank awareness)."""

    name = "affinity"

    def target(self, adapter_id, replicas, table, rng):
        ranks = _live_ranks(replicas)
        return ranks[jump_hash(stable_hash64(adapter_id), len(ranks))] if ranks else None


POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (RankAwarePolicy, RandomPolicy, AffinityPolicy)}
