"""One set of policy names: the router's and the simulator's registries use them, and a shared name makes the
same choice in both (random, affinity, rank-aware)."""

from __future__ import annotations

import random
import re

import pytest

from lorafleet.placement.policies import POLICY_NAMES, affinity_rank, random_rank
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


def test_rank_aware_samples_the_table_as_the_simulator_does_and_falls_back_to_affinity():
    table = RoutingTable(4, {a: ((1, 0.25), (3, 0.75)) for a in ADAPTERS[:100]})
    router, replicas = ROUTER_POLICIES["rank-aware"](), [ReplicaView(rank=r) for r in (0, 1, 2, 3)]
    rng, sim_rng = random.Random(7), random.Random(7)
    assert [router.target(a, replicas, table, rng) for a in ADAPTERS] == [table.sample(a, sim_rng) for a in ADAPTERS]
    assert [router.target(a, replicas[1:], None, rng) for a in ADAPTERS] == [
        affinity_rank(a, [1, 2, 3]) for a in ADAPTERS]
