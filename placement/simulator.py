"""Discrete-event cluster simulator: a workload trace, N replicas, one policy → TTFT/TPOT/throughput/SLO."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lorafleet.infra.errors import InvalidPlacement
from lorafleet.placement.cost_model import StepCostModel
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.sim_policies import POLICIES, SimContext
from lorafleet.placement.sim_replica import INF, ReplicaSim, RequestData, SharedStore
from lorafleet.placement.workload import Workload, WorkloadSpec, generate


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Cluster and controller settings of one simulation (the workload is separate)."""

    num_replicas: int = 32
    cost: StepCostModel = field(default_factory=StepCostModel)
    points: OperatingPoints = field(default_factory=OperatingPoints.default)
    max_adapter_bytes: int | None = None  # None = the operating points' memory budget
    rebalance_period_s: float = 60.0
    ewma_alpha: float = 0.5
    warmup_fraction: float = 0.1  # requests arriving in the first 10% of the trace are not measured
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise InvalidPlacement(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.rebalance_period_s <= 0 or not 0 <= self.warmup_fraction < 1:
            raise InvalidPlacement("need rebalance_period_s > 0 and warmup_fraction in [0, 1)")

    @property
    def adapter_memory(self) -> int:
        return int(self.max_adapter_bytes or self.points.max_adapter_bytes)


@dataclass(frozen=True, slots=True)
class SimResult:
    """Metrics of one policy on one trace; `ttft_s`/`tpot_s` are the measured requests (for plots)."""

    policy: str
    metrics: dict
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    ranks: np.ndarray


def cluster_capacity(workload: Workload, points: OperatingPoints, num_replicas: int) -> float:
    """Tokens/s the cluster sustains under the SLO when each rank class gets replicas of its own:
    num_replicas / Σ_c (token share_c / cap_c), from the time-0 popularity."""
    ranks = workload.adapter_ranks
    caps = np.array([points.capacity(int(r)) for r in ranks])
    return num_replicas / float((workload.popularity / caps).sum())


def all_mixed_capacity(workload: Workload, points: OperatingPoints, num_replicas: int) -> float:
    """Tokens/s the cluster sustains under the SLO when every replica serves the whole rank mix (padded kernels:
    each step pays the batch's max rank, which with large batches is the largest rank of the workload)."""
    return num_replicas * points.capacity(int(workload.adapter_ranks.max()))


def rate_for_load(spec: WorkloadSpec, points: OperatingPoints, num_replicas: int, load: float) -> float:
    """Request rate (req/s) at which demand = `load` x cluster_capacity."""
    if not load > 0:
        raise InvalidPlacement(f"load must be > 0, got {load}")
    probe = generate(spec.with_(num_requests=1))
    return load * cluster_capacity(probe, points, num_replicas) / spec.mean_tokens_per_request


def run_policy(workload: Workload, policy_name: str, config: SimConfig) -> SimResult:
    """Simulate `workload` on `config.num_replicas` replicas routed by `policy_name`."""
    if policy_name not in POLICIES:
        raise InvalidPlacement(f"unknown policy '{policy_name}'; choose from: {', '.join(POLICIES)}")
    policy = POLICIES[policy_name]()
    n = workload.num_requests
    ranks = workload.adapter_ranks
    adapter = workload.adapter_index.tolist()
    data = RequestData(
        arrival=workload.arrival_s.tolist(),
        adapter=adapter,
        prompt=workload.prompt_tokens.tolist(),
        output=workload.output_tokens.tolist(),
        rank=ranks[workload.adapter_index].tolist(),
        adapter_bytes=[config.points.adapter_bytes(int(r)) for r in ranks],
        first_token=[math.nan] * n,
        finish=[math.nan] * n,
    )
    memory = None if policy.unlimited_memory else config.adapter_memory
    store = SharedStore(config.cost.store_bytes_per_s)
    replicas = [ReplicaSim(j, config.cost, memory, data, store, policy.host_all) for j in range(config.num_replicas)]
    ctx = SimContext(workload, replicas, config.points, config.adapter_memory, config.seed,
                     config.rebalance_period_s, config.ewma_alpha)
    policy.setup(ctx)
    choose, rebalance = policy.choose, policy.rebalance
    period = config.rebalance_period_s
    next_rebalance = period
    for i, now in enumerate(data.arrival):
        while now >= next_rebalance:
            rebalance(next_rebalance)
            next_rebalance += period
        if policy.needs_loads:
            for replica in replicas:
                if replica.clock < now:
                    replica.advance(now)
        replica = replicas[choose(i, adapter[i], now)]
        replica.advance(now)
        replica.submit(i, now)
    for replica in replicas:
        replica.advance(INF)
    return _result(policy_name, workload, data, replicas, ctx, config)


def _percentiles(values: np.ndarray, prefix: str) -> dict:
    if values.size == 0:
        return {f"p50_{prefix}": None, f"p95_{prefix}": None, f"p99_{prefix}": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {f"p50_{prefix}": float(p50), f"p95_{prefix}": float(p95), f"p99_{prefix}": float(p99)}


def _result(name, workload, data, replicas, ctx, config) -> SimResult:
    arrival = workload.arrival_s
    first = np.asarray(data.first_token)
    finish = np.asarray(data.finish)
    out = workload.output_tokens
    start = config.warmup_fraction * workload.duration_s
    measured = arrival >= start
    ttft = (first - arrival)[measured]
    tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0)[measured]
    tokens = (workload.prompt_tokens + out)[measured]
    span = float(finish[measured].max() - start) if measured.any() else 0.0
    slo_ok = (ttft <= config.points.slo_p95_ttft_s) & (tpot <= config.points.slo_p95_tpot_s)
    ranks = workload.adapter_ranks[workload.adapter_index][measured]
    metrics = {
        **_percentiles(ttft, "ttft_s"),
        **_percentiles(tpot, "tpot_s"),
        "mean_ttft_s": float(ttft.mean()) if ttft.size else None,
        "throughput_tokens_per_s": float(tokens.sum() / span) if span > 0 else 0.0,
        "throughput_requests_per_s": float(tokens.size / span) if span > 0 else 0.0,
        "slo_attainment": float(slo_ok.mean()) if slo_ok.size else None,
        "meets_slo": bool(
            ttft.size
            and np.percentile(ttft, 95) <= config.points.slo_p95_ttft_s
            and np.percentile(tpot, 95) <= config.points.slo_p95_tpot_s
        ),
        "p95_ttft_s_by_rank": {
            int(r): float(np.percentile(ttft[ranks == r], 95)) for r in np.unique(ranks)
        },
        "num_measured_requests": int(tokens.size),
        "num_cold_fetches": int(sum(r.num_fetches for r in replicas)),
        "fetched_gib": float(sum(r.fetched_bytes for r in replicas) / 2**30),
        "num_swaps": int(sum(r.num_swaps for r in replicas)),
        "swapped_gib": float(sum(r.swapped_bytes for r in replicas) / 2**30),
        "num_evictions": int(sum(r.num_evictions for r in replicas)),
        "max_resident_gib_per_replica": float(max(r.max_used_bytes for r in replicas) / 2**30),
        **queue_growth(arrival, first, start),
        "mean_batch": float(sum(r.batch_steps for r in replicas) / max(sum(r.num_steps for r in replicas), 1)),
        "mean_distinct_adapters": float(sum(r.distinct_steps for r in replicas)
                                        / max(sum(r.num_steps for r in replicas), 1)),
        "replica_busy_max": float(max(r.busy_s for r in replicas) / max(finish.max(), 1e-9)),
        "replica_busy_min": float(min(r.busy_s for r in replicas) / max(finish.max(), 1e-9)),
        "num_rebalances": len(ctx.churn),
        "churn_per_rebalance": float(np.mean(ctx.churn)) if ctx.churn else None,
        "new_placements_per_rebalance": float(np.mean(ctx.new_placements)) if ctx.new_placements else None,
    }
    return SimResult(name, metrics, ttft, tpot, ranks)


GROWTH_WINDOW = 0.1  # the last 10% of the trace's arrivals
GROWTH_THRESHOLD = 0.01  # backlog growth over the window, as a share of the window's arrivals


def queue_growth(arrival: np.ndarray, first_token: np.ndarray, start: float) -> dict:
    """Is the backlog (requests arrived, first token not yet out) still growing at the end of the trace?

    Least-squares line through the backlog over the last 10% of the arrivals (21 samples): a stable cluster's
    backlog wanders around a level, an overloaded one's grows by (arrival - service rate) x time. Flagged when the
    line's rise over the window exceeds 1% of the window's arrivals (arrivals outpace service by > 1%) and is more
    than twice the backlog's scatter around the line (not a random wander)."""
    end = float(arrival[-1]) if arrival.size else 0.0
    begin = max(start, end - GROWTH_WINDOW * end)
    if end <= begin:
        return {"backlog_end": 0, "backlog_growth": 0.0, "is_queue_growing": False}
    times = np.linspace(begin, end, 21)
    arrived = np.searchsorted(arrival, times, side="right")
    started = np.searchsorted(np.sort(first_token), times, side="right")
    backlog = (arrived - started).astype(np.float64)
    slope, intercept = np.polyfit(times, backlog, 1)
    scatter = float(np.std(backlog - (slope * times + intercept)))
    rise = float(slope) * (end - begin)
    growth = rise / max(int(arrived[-1] - arrived[0]), 1)
    return {"backlog_end": int(backlog[-1]), "backlog_growth": growth,
            "is_queue_growing": bool(growth > GROWTH_THRESHOLD and rise > 2 * scatter)}


def replicas_needed(
    spec: WorkloadSpec, policy_name: str, config: SimConfig, max_replicas: int | None = None
) -> int | None:
    """Fewest replicas for which `policy_name` meets the SLO (P95 TTFT and P95 TPOT) on `spec`'s trace;
    None if not even `max_replicas` (default 4 x config.num_replicas) do. Binary search: assumes monotone."""
    workload = generate(spec)
    cache: dict[int, bool] = {}

    def meets(num: int) -> bool:
        if num not in cache:
            result = run_policy(workload, policy_name, _with_replicas(config, num))
            cache[num] = result.metrics["meets_slo"]
        return cache[num]

    hi = max_replicas or 4 * config.num_replicas
    lo = 1
    probe = config.num_replicas
    while not meets(probe):
        if probe >= hi:
            return None
        lo, probe = probe + 1, min(hi, 2 * probe)
    hi = probe
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _with_replicas(config: SimConfig, num: int) -> SimConfig:
    return SimConfig(num, config.cost, config.points, config.max_adapter_bytes, config.rebalance_period_s,
                     config.ewma_alpha, config.warmup_fraction, config.seed)


def compare(
    spec: WorkloadSpec,
    policies: list[str],
    config: SimConfig,
    find_replicas: bool = True,
    search_requests: int = 100_000,
) -> dict[str, SimResult]:
    """Run every policy on the same trace; with `find_replicas`, add `replicas_needed` to each one's metrics
    (searched on the first `search_requests` requests of the same workload to bound the run time)."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise InvalidPlacement(f"unknown policy '{(unknown or [''])[0]}'; choose from: {', '.join(POLICIES)}")
    workload = generate(spec)
    results = {name: run_policy(workload, name, config) for name in policies}
    for name, result in results.items():
        needed = None
        if find_replicas:
            needed = replicas_needed(spec.with_(num_requests=min(search_requests, spec.num_requests)), name, config)
        result.metrics["replicas_needed"] = needed
    return results
