"""Routing/placement policies the simulator compares; each subclasses SimPolicy and registers in POLICIES.

Names and shared choices: placement/policies.py (the router's random, affinity and rank-aware are the same code).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lorafleet.placement.demand_estimator import DemandEstimator, InMemoryCounters
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.policies import affinity_rank, random_rank
from lorafleet.placement.routing_table import RoutingTable
from lorafleet.placement.sim_replica import ReplicaSim
from lorafleet.placement.solver import AdapterLoad, solve
from lorafleet.placement.table_diff import diff
from lorafleet.placement.workload import Workload


@dataclass(slots=True)
class SimContext:
    """What a policy sees: the trace, the replicas (index = replica rank) and the cluster's profile."""

    workload: Workload
    replicas: list[ReplicaSim]
    points: OperatingPoints
    max_adapter_bytes: int
    seed: int
    rebalance_period_s: float
    ewma_alpha: float
    churn: list[float] = field(default_factory=list)  # per rebalance
    new_placements: list[int] = field(default_factory=list)  # per rebalance


class SimPolicy:
    """Base: route each request to a replica; optionally rebalance every period."""

    name = "base"
    needs_loads = False  # True: replicas are advanced to `now` before choose() (state-dependent routing)
    unlimited_memory = False  # True: every adapter stays resident everywhere (no memory budget)

    def setup(self, ctx: SimContext) -> None:
        self.ctx = ctx
        self.num_replicas = len(ctx.replicas)
        self.live_ranks = range(self.num_replicas)  # simulated replicas never die
        self.rng = random.Random(ctx.seed)

    def choose(self, i: int, adapter: int, now: float) -> int:
        raise NotImplementedError

    def rebalance(self, now: float) -> None:
        """Called every rebalance period (simulated time) before routing the next request."""


class RandomPolicy(SimPolicy):
    name = "random"

    def choose(self, i: int, adapter: int, now: float) -> int:
        return random_rank(self.live_ranks, self.rng)


class RoundRobinPolicy(SimPolicy):
    name = "round-robin"

    def choose(self, i: int, adapter: int, now: float) -> int:
        return i % self.num_replicas


def _least_loaded(replicas: list[ReplicaSim], i: int) -> int:
    loads = [r.num_outstanding for r in replicas]
    low = min(loads)
    ties = [j for j, load in enumerate(loads) if load == low]
    return ties[i % len(ties)]  # rotate among ties: no bias toward replica 0


class LeastLoadedPolicy(SimPolicy):
    """Fewest outstanding requests (queued + fetching + running)."""

    name = "least-loaded"
    needs_loads = True

    def choose(self, i: int, adapter: int, now: float) -> int:
        return _least_loaded(self.ctx.replicas, i)


class AffinityPolicy(SimPolicy):
    """Consistent hash of the adapter id: one home replica per adapter, whatever its load."""

    name = "affinity"

    def setup(self, ctx: SimContext) -> None:
        super().setup(ctx)
        self.home = [affinity_rank(a, self.live_ranks) for a in ctx.workload.adapter_ids]

    def choose(self, i: int, adapter: int, now: float) -> int:
        return self.home[adapter]


class AllEverywherePolicy(SimPolicy):
    """S-LoRA style: every adapter resident on every replica (memory unbounded), least-loaded routing."""

    name = "s-lora-all"
    needs_loads = True
    unlimited_memory = True

    def setup(self, ctx: SimContext) -> None:
        super().setup(ctx)
        for replica in ctx.replicas:
            for adapter in range(len(ctx.workload.adapter_ids)):
                replica.preload(adapter)

    def choose(self, i: int, adapter: int, now: float) -> int:
        return _least_loaded(self.ctx.replicas, i)


class RankAwarePolicy(SimPolicy):
    """LoRAFleet: the rank-aware solver's table, re-solved every period from EWMA demand of the counters."""

    name = "rank-aware"

    def setup(self, ctx: SimContext) -> None:
        super().setup(ctx)
        w = ctx.workload
        self.ranks = [int(r) for r in w.adapter_ranks]
        self.index = {a: k for k, a in enumerate(w.adapter_ids)}
        self.counters = InMemoryCounters(bucket_s=ctx.rebalance_period_s, retention_s=10 * ctx.rebalance_period_s)
        self.estimator = DemandEstimator(alpha=ctx.ewma_alpha)
        # The deployment existed before the simulated period: the first table comes from time-0 demand.
        expected = w.expected_tokens_per_s()
        self.estimator.observe({a: d * ctx.rebalance_period_s for a, d in expected.items()}, ctx.rebalance_period_s)
        self.table = self._solve(expected, previous=None)
        for adapter_id, entry in self.table.entries.items():
            for replica, _ in entry:
                ctx.replicas[replica].prefetch(self.index[adapter_id], 0.0)
        self.record = self.counters.record
        self.sample = self.table.sample
        self.adapter_ids = w.adapter_ids
        self.tokens = [p + o for p, o in zip(w.prompt_tokens.tolist(), w.output_tokens.tolist(), strict=True)]

    def _solve(self, demand: dict[str, float], previous: RoutingTable | None) -> RoutingTable:
        loads = [AdapterLoad(a, self.ranks[self.index[a]], d) for a, d in demand.items() if a in self.index]
        return solve(
            loads, self.ctx.points, self.num_replicas, previous=previous, seed=self.ctx.seed,
            max_adapter_bytes=self.ctx.max_adapter_bytes,
        ).table

    def choose(self, i: int, adapter: int, now: float) -> int:
        adapter_id = self.adapter_ids[adapter]
        self.record(adapter_id, self.tokens[i], 1, now)
        return self.sample(adapter_id, self.rng)   # RoutingTable.sample, as the router's rank-aware policy

    def rebalance(self, now: float) -> None:
        rates = self.estimator.update(self.counters, self.ctx.rebalance_period_s, now - 1e-9)
        new = self._solve(rates, previous=self.table)
        change = diff(self.table, new, rates)
        self.ctx.churn.append(change.churn)
        self.ctx.new_placements.append(change.num_new_placements)
        for move in change.moves:
            for replica in move.added_replicas:
                if move.adapter_id in new.entries:
                    self.ctx.replicas[replica].prefetch(self.index[move.adapter_id], now)
        self.table = new
        self.sample = new.sample


# Every name of placement/policies.py POLICY_NAMES, in its order (the `lorafleet simulate` default).
POLICIES: dict[str, type[SimPolicy]] = {
    cls.name: cls
    for cls in (RandomPolicy, RoundRobinPolicy, LeastLoadedPolicy, AffinityPolicy, AllEverywherePolicy, RankAwarePolicy)
}
