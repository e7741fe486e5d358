"""The discrete-event simulator: conservation, determinism, policies, rank-aware vs random."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorafleet.infra.errors import InvalidPlacement
from lorafleet.placement import POLICIES, SimConfig, compare, rate_for_load, run_policy
from lorafleet.placement.cost_model import StepCostModel
from lorafleet.placement.sim_profile import rank_interference
from lorafleet.placement.sim_replica import ReplicaSim, RequestData
from lorafleet.placement.sim_sweep import max_load_meeting_slo, parse_loads, sweep
from lorafleet.placement.workload import WorkloadSpec, generate

pytestmark = pytest.mark.timeout(300)  # a hang fails fast instead of stalling CI

SMALL = WorkloadSpec(num_adapters=60, num_requests=3000, ranks=(8, 16, 32, 64, 128), seed=4)


def _small(num_replicas=6, load=0.7, **changes):
    config = SimConfig(num_replicas=num_replicas, seed=changes.pop("seed", 0), **changes)
    spec = SMALL.with_(request_rate=rate_for_load(SMALL, config.points, num_replicas, load))
    return generate(spec), config


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_request_finishes_once_in_order(policy):
    workload, config = _small()
    result = run_policy(workload, policy, config)
    m = result.metrics
    assert m["num_measured_requests"] == int((workload.arrival_s >= 0.1 * workload.duration_s).sum())
    assert np.isfinite(result.ttft_s).all() and (result.ttft_s > 0).all()
    assert (result.tpot_s >= 0).all()
    assert m["p50_ttft_s"] <= m["p95_ttft_s"] <= m["p99_ttft_s"]
    assert 0.0 <= m["slo_attainment"] <= 1.0 and m["throughput_tokens_per_s"] > 0


def test_deterministic_for_a_seed():
    workload, config = _small()
    for policy in ("random", "rank-aware", "least-loaded"):
        first, second = run_policy(workload, policy, config), run_policy(workload, policy, config)
        assert first.metrics == second.metrics
        assert np.array_equal(first.ttft_s, second.ttft_s)


def test_rank_aware_beats_random_on_p95_ttft_with_heterogeneous_ranks():
    spec = WorkloadSpec(num_adapters=80, num_requests=6000, ranks=(8, 128), seed=11)
    config = SimConfig(num_replicas=8, seed=11)
    spec = spec.with_(request_rate=rate_for_load(spec, config.points, 8, 0.8))
    results = compare(spec, ["random", "rank-aware"], config, find_replicas=False)
    random_p95 = results["random"].metrics["p95_ttft_s"]
    ours = results["rank-aware"].metrics["p95_ttft_s"]
    assert ours < random_p95, (ours, random_p95)
    assert results["rank-aware"].metrics["num_cold_fetches"] < results["random"].metrics["num_cold_fetches"]


def test_rank_aware_rebalances_with_low_churn():
    workload, config = _small(rebalance_period_s=10.0)
    m = run_policy(workload, "rank-aware", config).metrics
    assert m["num_rebalances"] >= 2
    assert 0.0 <= m["churn_per_rebalance"] < 0.5


def test_affinity_hot_spot_and_unlimited_all_everywhere_never_loads():
    workload, config = _small()
    unlimited = run_policy(workload, "s-lora-unlimited", config).metrics
    assert unlimited["num_cold_fetches"] == 0 and unlimited["num_swaps"] == 0
    affinity = run_policy(workload, "affinity", config).metrics
    assert affinity["num_cold_fetches"] <= len(workload.adapter_ids)


@pytest.mark.parametrize("policy", [p for p in sorted(POLICIES) if p != "s-lora-unlimited"])
def test_gpu_adapter_budget_is_never_exceeded(policy):
    budget = 1536 * 2**20   # 6 of them hold the placed adapters (~6 GiB), no replica holds every adapter
    workload, config = _small(max_adapter_bytes=budget)
    m = run_policy(workload, policy, config).metrics
    assert m["max_resident_gib_per_replica"] * 2**30 <= budget
    assert m["num_cold_fetches"] + m["num_swaps"] > 0


def test_physical_all_everywhere_swaps_from_host_over_pcie():
    """s-lora-all: every adapter in host memory, the GPU budget an LRU; misses are PCIe swaps, never store fetches,
    and cost less than fetches from the store would."""
    workload, config = _small(max_adapter_bytes=600 * 2**20)
    m = run_policy(workload, "s-lora-all", config).metrics
    assert m["num_cold_fetches"] == 0 and m["num_swaps"] > 0 and m["num_evictions"] > 0
    assert m["swapped_gib"] > 0
    slow = run_policy(workload, "s-lora-all", _small(max_adapter_bytes=600 * 2**20,
                                                      cost=StepCostModel(pcie_bytes_per_s=0.2e9))[1]).metrics
    assert slow["num_swaps"] > 0 and slow["p95_ttft_s"] > m["p95_ttft_s"]


def test_a_load_waits_for_memory_held_by_running_requests():
    """GPU memory is reserved when a load starts; with every resident adapter in use the next load waits until a
    request finishes, so the budget holds at every instant."""
    data = RequestData(arrival=[0.0, 0.0, 0.0], adapter=[0, 1, 2], prompt=[16, 16, 16], output=[20, 20, 20],
                       rank=[8, 8, 8], adapter_bytes=[100, 100, 100], first_token=[np.nan] * 3,
                       finish=[np.nan] * 3)
    replica = ReplicaSim(0, StepCostModel(), 200, data, host_all=True)
    for i in range(3):
        replica.submit(i, 0.0)
    assert replica.used_bytes == 200 and list(replica.pending) == [2]   # the third load waits
    replica.advance(math.inf)
    assert replica.max_used_bytes <= 200 and replica.num_swaps == 3 and replica.num_evictions >= 1
    assert all(np.isfinite(data.finish)) and data.first_token[2] > max(data.finish[0], data.finish[1]) - 1e-9


def test_a_fetched_adapter_waits_in_host_memory_for_gpu_room():
    """A fetch from the store takes GPU memory when it arrives; with the budget held by running requests it is
    staged in host memory until one finishes."""
    data = RequestData(arrival=[0.0, 0.0, 0.0], adapter=[0, 1, 2], prompt=[16, 16, 16], output=[20, 20, 20],
                       rank=[8, 8, 8], adapter_bytes=[100, 100, 100], first_token=[np.nan] * 3,
                       finish=[np.nan] * 3)
    replica = ReplicaSim(0, StepCostModel(), 200, data)
    for i in range(3):
        replica.submit(i, 0.0)
    assert replica.used_bytes == 0 and replica.num_fetches == 3   # in flight from the store: no GPU memory yet
    replica.advance(math.inf)
    assert replica.max_used_bytes <= 200 and replica.num_swaps == 0 and replica.num_evictions >= 1
    assert all(np.isfinite(data.finish)) and data.first_token[2] > min(data.finish[0], data.finish[1]) - 1e-9


def test_queue_growth_flags_an_overloaded_run_not_a_light_one():
    light = run_policy(_small(load=0.3)[0], "random", _small()[1])
    heavy = run_policy(_small(load=1.6)[0], "random", _small()[1])
    assert not light.metrics["is_queue_growing"] and light.metrics["backlog_growth"] < 0.01
    assert heavy.metrics["is_queue_growing"] and heavy.metrics["backlog_growth"] > 0.05


def test_sweep_reports_the_largest_load_meeting_the_slo_per_seed():
    spec = SMALL.with_(num_requests=1500)
    config = SimConfig(num_replicas=4)
    result = sweep(spec, ["random", "rank-aware"], config, (0.4, 1.4), (1, 2), search_load=0.5, search_requests=800)
    assert result["loads"] == [0.4, 1.4] and set(result["capacity_by_seed"]) == {"1", "2"}
    for seed in ("1", "2"):
        c = result["capacity_by_seed"][seed]
        assert 0 < c["all_mixed_tokens_per_s"] < c["rank_isolated_tokens_per_s"]
    for entry in result["policies"].values():
        assert entry["routing"]
        for row in entry["by_seed"].values():
            assert row["meets_slo"][0] and not row["meets_slo"][1] and row["is_queue_growing"][1]
            assert row["max_load_meeting_slo"] == 0.4 and row["replicas_for_slo"] >= 1
        assert entry["max_load_meeting_slo_mean"] == 0.4


def test_sweep_helpers():
    assert parse_loads("0.7:0.95:0.025") == tuple(round(0.7 + 0.025 * k, 6) for k in range(11))
    assert parse_loads("0.9,0.7") == (0.7, 0.9)
    with pytest.raises(InvalidPlacement, match="--sweep"):
        parse_loads("0.7:0.6:0.1")
    assert max_load_meeting_slo([0.7, 0.8, 0.9], [True, False, True]) == 0.7   # the first miss ends it
    assert max_load_meeting_slo([0.7, 0.8], [False, True]) is None


def test_padded_kernels_show_rank_interference_sum_kernels_less():
    padded = rank_interference(StepCostModel(kernel="padded"), num_requests=4000)
    summed = rank_interference(StepCostModel(kernel="sum"), num_requests=4000)
    assert padded["increase"] > 0.4  # calibrated to LoRAServe's +84% at 20k requests
    assert summed["increase"] < padded["increase"]


def test_unknown_policy_is_invalid():
    workload, config = _small()
    with pytest.raises(InvalidPlacement, match="unknown policy"):
        run_policy(workload, "nope", config)


@pytest.mark.slow
def test_one_million_requests_run_through():
    """A trace the size of the scale benchmark runs through (its speed lives in `lorafleet simulate --record`)."""
    spec = WorkloadSpec(num_requests=1_000_000, seed=0)
    config = SimConfig(num_replicas=32)
    workload = generate(spec.with_(request_rate=rate_for_load(spec, config.points, 32, 0.7)))
    result = run_policy(workload, "rank-aware", config)
    assert result.metrics["num_measured_requests"] > 800_000
