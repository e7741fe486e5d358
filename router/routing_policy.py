"""Replica choice policies (pure, no Ray): rank-aware table sampling, random, adapter affinity.

The names and the target-rank logic are the simulator's too (lorafleet.placement.policies, RoutingTable.sample).
A policy turns (adapter id, live replicas, routing table) into tiers of replicas, most preferred first;
Ray Serve sends the request to the least-queued replica with room in the first tier that has one. The
fallback tiers are the same for every policy: replicas already holding the adapter (least queued first),
then every other live replica. Dead replicas never appear: Serve drops them from the candidates, and neither do
replicas that cannot run the adapter (its rank above their max_rank, a PEFT type their engine lacks: a vLLM
replica of a lower rank class) while any replica can.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from lorafleet.placement.policies import affinity_rank, choose_weighted_p2c, random_rank
from lorafleet.placement.routing_table import RoutingTable

Tiers = list[list["ReplicaView"]]


@dataclass(slots=True)
class ReplicaView:
    """What routing knows of a live replica: stable rank (None until its first stats report), load, residency."""

    rank: int | None
    queue_len: int = 0
    resident: frozenset[str] = frozenset()
    replica: Any = field(default=None, repr=False)
    max_rank: int | None = None           # the largest adapter rank it runs (None: not reported)
    adapter_types: tuple[str, ...] = ()   # the PEFT types it runs; () = every type

    def can_run(self, rank: int | None, peft_type: str | None) -> bool:
        """Whether an adapter of this rank and type runs here (a fact unknown on either side: assume it does)."""
        return ((rank is None or self.max_rank is None or rank <= self.max_rank)
                and (peft_type is None or not self.adapter_types or peft_type in self.adapter_types))


class RoutingPolicy(ABC):
    """Base of replica choice policies; subclasses register in POLICIES by `name`."""

    name: str

    def choose(self, adapter_id: str | None, replicas: list[ReplicaView], table: RoutingTable | None,
               rng: random.Random, rank: int | None = None, peft_type: str | None = None) -> Tiers:
        """Tiers: the target rank; then replicas holding the adapter; then the rest (each least queued first),
        only replicas that can run an adapter of `rank` and `peft_type` (the registry's, None = unknown) while
        any can (else every replica: the one chosen answers why it cannot). One sort, two passes per request."""
        if not replicas:
            return []
        if rank is not None or peft_type is not None:
            able = [r for r in replicas if r.can_run(rank, peft_type)]
            replicas = able or replicas
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
    """LoRAServe's probabilistic table, load-aware within it: among an adapter's table replicas the shorter queue of
    two weighted draws (choose_weighted_p2c; a rank without a live replica counts as infinitely long); adapters
    not in the table use its consistent-hash default."""

    name = "rank-aware"

    def target(self, adapter_id, replicas, table, rng):
        if table is None:   # none published yet: the affinity choice
            return affinity_rank(adapter_id, _live_ranks(replicas))
        entry = table.entries.get(adapter_id)
        if entry is None or len(entry) == 1:
            return table.sample(adapter_id, rng)
        queues = {r.rank: r.queue_len for r in replicas}
        return choose_weighted_p2c(entry, lambda rank: queues.get(rank, math.inf), rng)


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
