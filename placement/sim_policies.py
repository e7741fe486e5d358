"""Routing/placement policies the simulator compares; each subclasses SimPolicy and registers in POLICIES.

Names and shared choices: placement/policies.py (the router's random, affinity and rank-aware are the same code).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lorafleet.placement.demand_estimator import DemandEstimator, InMemoryCounters
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.policies import affinity_rank, choose_weighted_p2c, random_rank
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
    host_all = False  # True: every adapter in every replica's host memory; GPU loads are PCIe swaps
    routing = ""  # how a request picks its replica, one line for the results table

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
    routing = "uniformly random replica"

    def choose(self, i: int, adapter: int, now: float) -> int:
        return random_rank(self.live_ranks, self.rng)


class RoundRobinPolicy(SimPolicy):
    name = "round-robin"
    routing = "request i to replica i mod N"

    def choose(self, i: int, adapter: int, now: float) -> int:
        return i % self.num_replicas


def _least_loaded(replicas: list[ReplicaSim], i: int) -> int:
    loads = [r.num_outstanding for r in replicas]
    low = min(loads)
    ties = [j for j, load in enumerate(loads) if load == low]
    return ties[i % len(ties)]  # rotate among ties: no bias toward replica 0


class LeastLoadedPolicy(SimPolicy):
    """Fewest outstanding requests (queued + loading + running)."""

    name = "least-loaded"
    routing = "fewest outstanding requests of all replicas"
    needs_loads = True

    def choose(self, i: int, adapter: int, now: float) -> int:
        return _least_loaded(self.ctx.replicas, i)


class AffinityPolicy(SimPolicy):
    """Consistent hash of the adapter id: one home replica per adapter, whatever its load."""

    name = "affinity"
    routing = "consistent hash of the adapter id"

    def setup(self, ctx: SimContext) -> None:
        super().setup(ctx)
        self.home = [affinity_rank(a, self.live_ranks) for a in ctx.workload.adapter_ids]

    def choose(self, i: int, adapter: int, now: float) -> int:
        return self.home[adapter]


class AllEverywherePolicy(SimPolicy):
    """S-LoRA (Sheng et al., Sec. 5): every adapter in every replica's host memory, the same GPU adapter budget as
    every policy (an LRU; a miss swaps the adapter in over PCIe), least-loaded routing."""

    name = "s-lora-all"
    routing = "fewest outstanding requests of all replicas"
    needs_loads = True
    host_all = True

    def setup(self, ctx: SimContext) -> None:
        super().setup(ctx)
        # The deployment existed before the simulated period: the most popular adapters that fit are on the GPU.
        if not ctx.replicas:
            return
        sizes, budget = ctx.replicas[0].data.adapter_bytes, ctx.replicas[0].max_adapter_bytes
        hottest, used = [], 0
        for adapter in sorted(range(len(ctx.workload.adapter_ids)), key=lambda a: -ctx.workload.popularity[a]):
            if budget is None or used + sizes[adapter] <= budget:
                hottest.append(adapter)
                used += sizes[adapter]
        for replica in ctx.replicas:
            for adapter in reversed(hottest):  # the hottest last: most recently used, evicted last
                replica.preload(adapter)

    def choose(self, i: int, adapter: int, now: float) -> int:
        return _least_loaded(self.ctx.replicas, i)


class UnlimitedAllEverywherePolicy(AllEverywherePolicy):
    """Every adapter resident on every replica's GPU at no cost (unbounded memory), least-loaded routing: not a
    physical system, an upper bound for all-everywhere (and the one-replica profile's setting)."""

    name = "s-lora-unlimited"
    host_all = False
    unlimited_memory = True


class RankAwarePolicy(SimPolicy):
    """LoRAFleet: the rank-aware solver's table, re-solved every period from EWMA demand of the counters; among an
    adapter's table replicas the shorter queue of two distinct weighted draws (choose_weighted_p2c, as the router)."""

    name = "rank-aware"
    routing = "solver's table; shorter queue of 2 distinct draws weighted by the table"
    load_aware = True

    def setup(self, ctx: SimContext) -> None:
        super().setup(ctx)
        w = ctx.workload
        self.ranks = [int(r) for r in w.adapter_ranks]
        self.index = {a: k for k, a in enumerate(w.adapter_ids)}
        self.counters = InMemoryCounters(bucket_s=ctx.rebalance_period_s, retention_s=10 * ctx.rebalance_period_s)
        self.estimator = DemandEstimator(alpha=ctx.ewma_alpha)
        # The deployment existed before the simulated period: the first table comes from time-0 demand, and its
        # adapters are on their replicas.
        expected = w.expected_tokens_per_s()
        self.estimator.observe({a: d * ctx.rebalance_period_s for a, d in expected.items()}, ctx.rebalance_period_s)
        self.table = self._solve(expected, previous=None)
        for adapter_id, entry in self.table.entries.items():
            for replica, _ in entry:
                ctx.replicas[replica].preload(self.index[adapter_id])
        self.record = self.counters.record
        self.adapter_ids = w.adapter_ids
        self.tokens = [p + o for p, o in zip(w.prompt_tokens.tolist(), w.output_tokens.tolist(), strict=True)]
        self.now = 0.0

    def _solve(self, demand: dict[str, float], previous: RoutingTable | None) -> RoutingTable:
        loads = [AdapterLoad(a, self.ranks[self.index[a]], d) for a, d in demand.items() if a in self.index]
        return solve(
            loads, self.ctx.points, self.num_replicas, previous=previous, seed=self.ctx.seed,
            max_adapter_bytes=self.ctx.max_adapter_bytes,
        ).table

    def _queue_len(self, rank: int) -> int:
        replica = self.ctx.replicas[rank]
        replica.advance(self.now)
        return replica.num_outstanding

    def choose(self, i: int, adapter: int, now: float) -> int:
        adapter_id = self.adapter_ids[adapter]
        self.record(adapter_id, self.tokens[i], 1, now)
        entry = self.table.entries.get(adapter_id)
        if entry is None or not self.load_aware:
            return self.table.sample(adapter_id, self.rng)   # RoutingTable.sample: the consistent-hash default
        self.now = now
        return choose_weighted_p2c(entry, self._queue_len, self.rng)

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


class RankAwareSamplePolicy(RankAwarePolicy):
    """The same tables, each request drawn from its adapter's probabilities alone (RoutingTable.sample)."""

    name = "rank-aware-sample"
    routing = "solver's table; one draw from its probabilities"
    load_aware = False


# Every name of placement/policies.py POLICY_NAMES, in its order (the `lorafleet simulate` default).
POLICIES: dict[str, type[SimPolicy]] = {
    cls.name: cls
    for cls in (RandomPolicy, RoundRobinPolicy, LeastLoadedPolicy, AffinityPolicy, AllEverywherePolicy,
                UnlimitedAllEverywherePolicy, RankAwarePolicy, RankAwareSamplePolicy)
}
