"""One set of policy names: the router's and the simulator's registries use them, and a shared name makes the
same choice in both (random, affinity, rank-aware)."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from lorafleet.placement import sim_policies
from lorafleet.placement.policies import POLICY_NAMES, affinity_rank, choose_weighted_p2c, random_rank
from lorafleet.placement.routing_table import RoutingTable, default_replica
from lorafleet.placement.sim_policies import POLICIES as SIM_POLICIES
from lorafleet.placement.sim_policies import SimContext
from lorafleet.placement.workload import WorkloadSpec, generate
from lorafleet.router.routing_policy import POLICIES as ROUTER_POLICIES
from lorafleet.router.routing_policy import ReplicaView

ADAPTERS = [f"adapter-{i:05d}" for i in range(200)]


def test_registries_use_the_one_vocabulary():
    from lorafleet.infra.config import Settings

    assert tuple(SIM_POLICIES) == POLICY_NAMES   # `lorafleet simulate` compares all of them, in this order
    assert set(ROUTER_POLICIES) <= set(POLICY_NAMES)
    pattern = Settings.model_fields["routing_policy"].metadata[0].pattern
    assert set(re.fullmatch(r"\^\((.*)\)\$", pattern)[1].split("|")) == set(ROUTER_POLICIES)


def test_affinity_is_the_consistent_hash_default_over_the_live_ranks():
    for adapter_id in ADAPTERS:
        assert affinity_rank(adapter_id, range(7)) == default_replica(adapter_id, 7)
        assert affinity_rank(adapter_id, [1, 4, 6]) == [1, 4, 6][default_replica(adapter_id, 3)]
    assert affinity_rank("a", []) is None and random_rank([], random.Random(0)) is None


def _sim_choices(name: str, num_replicas: int, seed: int) -> tuple[list[int], list[str]]:
    workload = generate(WorkloadSpec(num_adapters=50, num_requests=300, request_rate=20.0, seed=seed))
    policy = SIM_POLICIES[name]()
    policy.setup(SimContext(workload, [object()] * num_replicas, None, 0, seed, 60.0, 0.5))
    indices = workload.adapter_index.tolist()
    return [policy.choose(i, a, 0.0) for i, a in enumerate(indices)], [workload.adapter_ids[a] for a in indices]


@pytest.mark.parametrize("name", ["random", "affinity"])
def test_a_shared_name_chooses_the_same_rank_in_router_and_simulator(name):
    num_replicas, seed = 5, 3
    sim, ids = _sim_choices(name, num_replicas, seed)
    router, rng = ROUTER_POLICIES[name](), random.Random(seed)
    replicas = [ReplicaView(rank=r) for r in range(num_replicas)]
    assert [router.target(a, replicas, None, rng) for a in ids] == sim
    assert len(set(sim)) > 1 and set(sim) <= set(range(num_replicas))


def test_rank_aware_is_the_shared_load_aware_choice_and_falls_back_to_affinity():
    """Router and simulator call the same choose_weighted_p2c on an adapter's table entry with their queue lengths;
    adapters not in the table go to its consistent-hash default; without a table, affinity."""
    table = RoutingTable(4, {a: ((1, 0.25), (2, 0.35), (3, 0.4)) for a in ADAPTERS[:100]}
                         | {a: ((2, 1.0),) for a in ADAPTERS[100:150]})
    queues = {0: 0, 1: 5, 2: 1, 3: 9}
    router = ROUTER_POLICIES["rank-aware"]()
    replicas = [ReplicaView(rank=r, queue_len=q) for r, q in queues.items()]
    rng, shared_rng = random.Random(7), random.Random(7)
    expected = [choose_weighted_p2c(table.entries[a], queues.__getitem__, shared_rng) if a in table.entries
                else default_replica(a, 4) for a in ADAPTERS]
    assert [router.target(a, replicas, table, rng) for a in ADAPTERS] == expected
    assert sim_policies.choose_weighted_p2c is choose_weighted_p2c   # the simulator's rank-aware calls it too
    assert [router.target(a, replicas[1:], None, rng) for a in ADAPTERS] == [
        affinity_rank(a, [1, 2, 3]) for a in ADAPTERS]


def _within_5_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * (n * p * (1 - p)) ** 0.5 + 1


def test_weighted_p2c_takes_the_shorter_queue_of_two_distinct_weighted_draws():
    """P(rank) = P(it is one of the two distinct draws and the other's queue is longer); the longest queue of three
    is never chosen; equal queues keep the table's shares (ties go to the first draw)."""
    entry = ((0, 0.1), (2, 0.25), (3, 0.65))
    queue = {0: 40, 2: 10, 3: 1}
    rng, n = random.Random(99), 40_000
    counts = Counter(choose_weighted_p2c(entry, queue.__getitem__, rng) for _ in range(n))
    p_pair_02 = 0.1 * 0.25 / 0.9 + 0.25 * 0.1 / 0.75   # the draws are ranks 0 and 2, in either order
    assert counts[0] == 0
    assert _within_5_sigma(counts[2], n, p_pair_02) and _within_5_sigma(counts[3], n, 1 - p_pair_02)
    level = Counter(choose_weighted_p2c(entry, lambda rank: 3, rng) for _ in range(n))
    for rank, p in entry:
        assert _within_5_sigma(level[rank], n, p)


def test_weighted_p2c_single_replica_and_rounding():
    class NoDraws:
        def random(self) -> float:
            raise AssertionError("a one-replica entry needs no draw")

    assert choose_weighted_p2c(((5, 1.0),), lambda rank: 0, NoDraws()) == 5

    class Top:
        def random(self) -> float:
            return 0.999999999999

    entry = ((1, 0.3), (2, 0.3), (4, 0.4 - 1e-9))   # probabilities summing just below 1
    assert choose_weighted_p2c(entry, lambda rank: {1: 0, 2: 0, 4: 0}[rank], Top()) in (1, 2, 4)
    assert choose_weighted_p2c(((1, 0.5), (2, 0.5)), lambda rank: {1: 3, 2: float("inf")}[rank],
                               random.Random(0)) == 1   # a rank without a live replica counts as infinitely long
