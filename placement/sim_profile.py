"""Operating points and rank interference measured on the simulator's step-time model (one replica).

This is where the packaged default placement/operating_points.json comes from (`lorafleet profile
--simulated`); `lorafleet profile` without --simulated measures the real engine instead.
"""

from __future__ import annotations

import numpy as np

from lorafleet.placement.cost_model import StepCostModel
from lorafleet.placement.operating_points import REFERENCE_ADAPTERS, OperatingPoints
from lorafleet.placement.simulator import SimConfig, run_policy
from lorafleet.placement.workload import WorkloadSpec, generate

# Memory defaults of the simulated replica: 8 GiB of adapter memory, 2 MiB per rank unit (q,k,v,o, fp16, 7B).
DEFAULT_MAX_ADAPTER_BYTES = 8 * 2**30
DEFAULT_ADAPTER_BYTES_PER_RANK = 2 * 2**20
PROFILE_ADAPTERS = REFERENCE_ADAPTERS  # adapters of the profiled rank, equally popular, all resident
CROWDING_ADAPTERS = (1, 4, 16, 64, 256)  # the same capacity with these many adapters (the crowding curve)


def _points_stub(slo_ttft_s: float, slo_tpot_s: float) -> OperatingPoints:
    return OperatingPoints({1: 1.0}, slo_ttft_s, slo_tpot_s, DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_ADAPTER_BYTES_PER_RANK)


def _one_replica(spec: WorkloadSpec, cost: StepCostModel, stub: OperatingPoints) -> dict:
    return run_policy(generate(spec), "s-lora-unlimited", SimConfig(1, cost, stub, warmup_fraction=0.1)).metrics


def _one_replica_p95(spec: WorkloadSpec, cost: StepCostModel, stub: OperatingPoints) -> tuple[float, float]:
    metrics = _one_replica(spec, cost, stub)
    return metrics["p95_ttft_s"], metrics["p95_tpot_s"]


def _probe_spec(base: WorkloadSpec, rank: int, num_requests: int, num_adapters: int) -> WorkloadSpec:
    return base.with_(num_adapters=num_adapters, zipf_alpha=0.0, ranks=(rank,), rank_weights=(),
                      num_requests=num_requests, drift_fraction=0.0)


def max_rate_under_slo(rank: int, cost: StepCostModel, base: WorkloadSpec, slo_ttft_s: float,
                       slo_tpot_s: float, num_requests: int = 6000, iterations: int = 12,
                       num_adapters: int = PROFILE_ADAPTERS) -> float:
    """Highest request rate (req/s) one replica serves `num_adapters` equally popular rank-`rank` adapters at
    within the SLO (bisection)."""
    stub = _points_stub(slo_ttft_s, slo_tpot_s)
    spec = _probe_spec(base, rank, num_requests, num_adapters)
    lo, hi = 0.0, 1.0
    while True:  # grow until the SLO breaks
        ttft, tpot = _one_replica_p95(spec.with_(request_rate=hi), cost, stub)
        if ttft > slo_ttft_s or tpot > slo_tpot_s:
            break
        lo, hi = hi, hi * 2
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ttft, tpot = _one_replica_p95(spec.with_(request_rate=mid), cost, stub)
        if ttft <= slo_ttft_s and tpot <= slo_tpot_s:
            lo = mid
        else:
            hi = mid
    return lo


def profile_operating_points(cost: StepCostModel, ranks: tuple[int, ...], slo_ttft_s: float, slo_tpot_s: float,
                             base: WorkloadSpec | None = None, num_requests: int = 6000,
                             crowding_adapters: tuple[int, ...] = CROWDING_ADAPTERS) -> OperatingPoints:
    """OperatingPoints of the simulated replica: tokens/s = max rate x mean (prompt + output) tokens, with 16
    adapters (`points`) and with each count of `crowding_adapters` (`crowding`, keyed by the distinct adapters
    per step measured at that rate)."""
    base = base or WorkloadSpec()
    tokens = base.mean_tokens_per_request
    stub = _points_stub(slo_ttft_s, slo_tpot_s)
    points, crowding = {}, {}
    for r in sorted(ranks):
        curve = []
        for n in sorted({PROFILE_ADAPTERS, *crowding_adapters}):
            rate = max_rate_under_slo(int(r), cost, base, slo_ttft_s, slo_tpot_s, num_requests, num_adapters=n)
            if n == PROFILE_ADAPTERS:
                points[int(r)] = rate * tokens
            if crowding_adapters:
                m = _one_replica(_probe_spec(base, int(r), num_requests, n).with_(request_rate=rate), cost, stub)
                curve.append((n, m["mean_distinct_adapters"], m["mean_batch"], rate * tokens))
        if curve:
            crowding[int(r)] = tuple(curve)
    meta = {
        "description": "Max tokens/s (prompt + output) of one replica per rank class with P95 TTFT and P95 TPOT "
        "within the SLO, Poisson arrivals, 16 equally popular resident adapters of that rank (crowding: "
        f"{', '.join(str(n) for n in crowding_adapters)} adapters).",
        "cost_model": cost.to_dict(),
        "workload_lengths": {"prompt_tokens": base.to_dict()["prompt_tokens"],
                             "output_tokens": base.to_dict()["output_tokens"],
                             "mean_tokens_per_request": round(tokens, 2)},
        "requests_per_probe": num_requests,
    }
    return OperatingPoints(points, slo_ttft_s, slo_tpot_s, DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_ADAPTER_BYTES_PER_RANK,
                           source="simulated: lorafleet profile --simulated (placement/sim_profile.py)", meta=meta,
                           crowding=crowding)


def rank_interference(cost: StepCostModel, low_rank: int = 8, high_rank: int = 128, load: float = 0.5,
                      num_requests: int = 20000, seed: int = 0) -> dict:
    """P95 TTFT of rank-`low_rank` requests alone vs half the requests switched to `high_rank` at the same
    total rate (`load` x the low-rank SLO rate), on one replica: LoRAServe's Fig. 1 experiment."""
    stub = _points_stub(1.0, 0.1)
    base = WorkloadSpec(seed=seed)
    rate = load * max_rate_under_slo(low_rank, cost, base, 1.0, 0.1)
    common = dict(num_adapters=2, zipf_alpha=0.0, num_requests=num_requests, request_rate=rate)
    alone = run_policy(generate(base.with_(ranks=(low_rank,), **common)), "s-lora-unlimited", SimConfig(1, cost, stub))
    mixed_spec = base.with_(ranks=(low_rank, high_rank), **common)
    mixed_w = generate(mixed_spec)
    if len(set(mixed_w.adapter_ranks.tolist())) < 2:  # make sure the two adapters have the two ranks
        mixed_w = generate(mixed_spec.with_(seed=seed + 1))
    mixed = run_policy(mixed_w, "s-lora-unlimited", SimConfig(1, cost, stub))
    p_alone = float(np.percentile(alone.ttft_s, 95))
    low = mixed.ttft_s[mixed.ranks == low_rank]
    p_mixed = float(np.percentile(low, 95))
    return {"rate": rate, "p95_ttft_alone_s": p_alone, "p95_ttft_co_served_s": p_mixed,
            "increase": p_mixed / p_alone - 1.0}
