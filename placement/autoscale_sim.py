"""Autoscaling over a simulated day: adapter-aware (the live policy's arithmetic) vs queue length (Serve's default),
each tuned to the same SLO, compared by replica-hours. `lorafleet simulate-autoscaling`.

The day is `epochs` windows. The request rate follows a cosine from `peak_to_trough`-times lower at midnight to
its peak at noon; two tenant populations drift against it: low-rank adapters (ranks 8, 16) carry the day, and
high-rank ones (64, 128) are half the traffic at night but 15% at noon. Before each window an autoscaler picks the
replica count from what it observed in the previous one (the first window runs at max_replicas); the window is
then simulated on that many replicas with rank-aware routing and placement.
- adapter-aware: demand per rank class over each class's operating point at `target` utilisation, and the active
  adapters' bytes over one replica's memory (placement.autoscaling.replicas_needed, as served), one window ahead
  along the trend of the last two windows, damped by `trend_damping` (placement.autoscaling.trend_forecast, as
  served; 0 = react to the last window alone).
- queue: Serve's replica_queue_length policy, ceil(requests in flight / `target` per replica), the requests in
  flight observed by Little's law (arrival rate x mean time in system); `queue_trend_damping` (default 0: Serve's
  policy as shipped) gives it the same forecast, to show what the forecast alone is worth.
Each policy's target is searched on a grid for the fewest replica-hours whose P95 TTFT over the whole day (every
measured request of every window) meets the operating points' SLO. Each window draws its own trace from its own seed
(within a population an adapter's rank may differ between windows). A count too small to hold the window's adapters at
all is raised until they fit (the memory floor). Limits: each window starts with empty queues (no backlog carried
over) and replicas start instantly (no cold-start delay); both policies see the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from lorafleet.infra.errors import InvalidPlacement, PlacementInfeasible
from lorafleet.placement.autoscaling import replicas_needed, trend_forecast
from lorafleet.placement.simulator import SimConfig, cluster_capacity, run_policy
from lorafleet.placement.workload import Workload, WorkloadSpec, generate

LOW_RANKS, HIGH_RANKS = (8, 16), (64, 128)
POLICY_TARGETS = {   # the coarse grid each policy's target is tuned on (25 values each), then refined
    "adapter-aware": tuple(round(float(x), 4) for x in np.linspace(0.4, 1.2, 25)),
    "queue": tuple(round(float(x), 4) for x in np.geomspace(1.0, 64.0, 25)),
}
# Between the coarse grid's cheapest target that meets the SLO and the next (cheaper, failing) one, this many more
# targets, evenly spaced in log: both policies are tuned to within ~1-4% of their cheapest meeting target.
REFINE_POINTS = 6
TUNING_RUNS = {policy: len(grid) + REFINE_POINTS for policy, grid in POLICY_TARGETS.items()}


@dataclass(frozen=True, slots=True)
class DiurnalSpec:
    epochs: int = 24
    epoch_requests: int = 4000
    max_replicas: int = 32
    min_replicas: int = 1
    peak_load: float = 0.8   # noon demand as a fraction of max_replicas' rank-isolated capacity
    peak_to_trough: float = 5.0
    night_high_rank_share: float = 0.5
    noon_high_rank_share: float = 0.15
    adapters_per_population: int = 100
    trend_damping: float = 0.5        # adapter-aware: the live policy's default (Settings.autoscale_trend_damping)
    queue_trend_damping: float = 0.0  # queue: Serve's policy has no forecast
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 2 or self.epoch_requests < 50:
            raise InvalidPlacement("need epochs >= 2 and epoch_requests >= 50")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise InvalidPlacement("need 1 <= min_replicas <= max_replicas")
        if not 0 < self.peak_load <= 2 or self.peak_to_trough < 1:
            raise InvalidPlacement("need peak_load in (0, 2] and peak_to_trough >= 1")
        if not (0 <= self.noon_high_rank_share <= 1 and 0 <= self.night_high_rank_share <= 1):
            raise InvalidPlacement("high-rank shares must be in [0, 1]")
        if not (0 <= self.trend_damping <= 1 and 0 <= self.queue_trend_damping <= 1):
            raise InvalidPlacement("trend dampings must be in [0, 1]")

    def phase(self, epoch: int) -> float:
        """0 at midnight, 1 at noon."""
        return (1 - math.cos(2 * math.pi * (epoch + 0.5) / self.epochs)) / 2

    def rate_factor(self, epoch: int) -> float:
        trough = 1 / self.peak_to_trough
        return trough + (1 - trough) * self.phase(epoch)

    def high_rank_share(self, epoch: int) -> float:
        p = self.phase(epoch)
        return self.night_high_rank_share + (self.noon_high_rank_share - self.night_high_rank_share) * p


def _merge(low: Workload, high: Workload, low_rate: float, high_rate: float) -> Workload:
    """One trace of two populations (distinct adapter ids), arrivals interleaved in time."""
    offset = len(low.adapter_ids)
    arrival = np.concatenate([low.arrival_s, high.arrival_s])
    order = np.argsort(arrival, kind="stable")
    total = low_rate + high_rate
    popularity = np.concatenate([low.popularity * low_rate, high.popularity * high_rate]) / total
    return Workload(
        spec=low.spec.with_(request_rate=total, num_requests=low.num_requests + high.num_requests),
        adapter_ids=low.adapter_ids + tuple(f"hi-{a}" for a in high.adapter_ids),
        adapter_ranks=np.concatenate([low.adapter_ranks, high.adapter_ranks]),
        popularity=popularity,
        arrival_s=arrival[order],
        adapter_index=np.concatenate([low.adapter_index, high.adapter_index + offset])[order],
        prompt_tokens=np.concatenate([low.prompt_tokens, high.prompt_tokens])[order],
        output_tokens=np.concatenate([low.output_tokens, high.output_tokens])[order],
    )


def day_workloads(spec: DiurnalSpec, config: SimConfig) -> list[Workload]:
    """One trace per window; the peak rate puts noon at `peak_load` of max_replicas' rank-isolated capacity."""
    base = WorkloadSpec(num_adapters=spec.adapters_per_population, seed=spec.seed)
    low_spec, high_spec = base.with_(ranks=LOW_RANKS), base.with_(ranks=HIGH_RANKS, seed=spec.seed + 1)
    noon = max(range(spec.epochs), key=spec.phase)
    share = spec.high_rank_share(noon)
    probe = _merge(generate(low_spec.with_(num_requests=1)), generate(high_spec.with_(num_requests=1)),
                   1 - share, share)
    peak_rate = (spec.peak_load * cluster_capacity(probe, config.points, spec.max_replicas)
                 / base.mean_tokens_per_request)
    days = []
    for epoch in range(spec.epochs):
        rate, share = peak_rate * spec.rate_factor(epoch), spec.high_rank_share(epoch)
        n_high = max(1, round(spec.epoch_requests * share))
        n_low = max(1, spec.epoch_requests - n_high)
        low = generate(low_spec.with_(request_rate=rate * (1 - share), num_requests=n_low, seed=spec.seed + 7 * epoch))
        high = generate(high_spec.with_(request_rate=rate * share, num_requests=n_high,
                                        seed=spec.seed + 7 * epoch + 1))
        days.append(_merge(low, high, rate * (1 - share), rate * share))
    return days


def _observe(workload: Workload, result, config: SimConfig) -> dict[str, float]:
    """What the fleet reported in a window: tokens/s per rank class, active adapter bytes, requests in flight."""
    duration = max(workload.duration_s, 1e-9)
    ranks = workload.adapter_ranks[workload.adapter_index]
    tokens = workload.prompt_tokens + workload.output_tokens
    stats: dict[str, float] = {"adapter_memory_bytes": float(config.adapter_memory)}
    for r in np.unique(ranks):
        stats[f"tokens_per_s_r{int(r)}"] = float(tokens[ranks == r].sum() / duration)
        stats[f"capacity_r{int(r)}"] = config.points.capacity(int(r))
    active = np.unique(workload.adapter_index)
    stats["active_adapter_bytes"] = float(sum(config.points.adapter_bytes(int(workload.adapter_ranks[a]))
                                              for a in active))
    mean_output = float(workload.output_tokens.mean())
    in_system = float(result.ttft_s.mean() + result.tpot_s.mean() * max(mean_output - 1, 0.0))
    stats["in_flight"] = workload.num_requests / duration * in_system
    return stats


def desired_replicas(policy: str, target: float, observed: dict[str, float], spec: DiurnalSpec,
                     history: list[tuple[float, float]] | None = None) -> int:
    """The count for the next window; `history` holds this policy's (window, need) of the windows so far and gets
    this window's need appended (the trend forecast reads the last two)."""
    if policy == "fixed":
        return spec.max_replicas
    if policy == "adapter-aware":
        needed, damping = replicas_needed([observed], target) or 0.0, spec.trend_damping
    elif policy == "queue":
        needed, damping = observed["in_flight"] / target, spec.queue_trend_damping
    else:
        raise InvalidPlacement(f"unknown autoscaling policy '{policy}'; choose from: adapter-aware, queue")
    history = [] if history is None else history
    history.append((float(len(history)), needed))
    ahead = trend_forecast(history[-2:], 1.0, damping)
    return int(min(spec.max_replicas, max(spec.min_replicas, math.ceil(ahead - 1e-9))))


def run_day(days: list[Workload], policy: str, target: float, spec: DiurnalSpec, config: SimConfig) -> dict:
    """Replica counts, replica-hours and the whole day's P95 TTFT of one policy at one target."""
    count, counts, ttft, hours = spec.max_replicas, [], [], 0.0
    history: list[tuple[float, float]] = []
    for workload in days:
        while True:   # too few replicas to hold the window's adapters at all: the fleet's memory floor
            try:
                result = run_policy(workload, "rank-aware", replace(config, num_replicas=count))
                break
            except PlacementInfeasible:
                if count >= spec.max_replicas:
                    raise
                count += 1
        counts.append(count)
        ttft.append(result.ttft_s)
        hours += count * workload.duration_s / 3600
        count = desired_replicas(policy, target, _observe(workload, result, config), spec, history)
    p95 = float(np.percentile(np.concatenate(ttft), 95))
    return {"target": target, "replica_hours": hours, "p95_ttft_s": p95,
            "meets_slo": p95 <= config.points.slo_p95_ttft_s, "replicas": counts}


def _refined(coarse: tuple[float, ...], grid: list[dict]) -> list[float]:
    """REFINE_POINTS targets between the cheapest meeting coarse target and the next larger one (none if no target
    meets the SLO or the cheapest is the grid's last)."""
    meeting = [i for i, g in enumerate(grid) if g["meets_slo"]]
    if not meeting:
        return []
    best = min(meeting, key=lambda i: grid[i]["replica_hours"])
    if best + 1 >= len(coarse):
        return []
    lo, hi = coarse[best], coarse[best + 1]
    return [round(float(x), 4) for x in np.geomspace(lo, hi, REFINE_POINTS + 2)[1:-1]]


def compare_autoscaling(spec: DiurnalSpec, config: SimConfig, policies=("adapter-aware", "queue"),
                        progress=None) -> dict:
    """{"policies": {name: best run (fewest replica-hours meeting the SLO; else the lowest P95), "grid": all}},
    "spec", "fixed": the day at max_replicas throughout, "saving": 1 - adapter-aware / queue replica-hours}."""
    days = day_workloads(spec, config)
    fixed = run_day(days, "fixed", 0.0, spec, config)   # no autoscaling: max_replicas all day
    out: dict = {"spec": asdict(spec), "slo_p95_ttft_s": config.points.slo_p95_ttft_s, "fixed": fixed,
                 "policies": {}}
    for policy in policies:
        grid = []

        def tune(target: float) -> None:
            grid.append(run_day(days, policy, target, spec, config))
            if progress is not None:
                progress()

        coarse = POLICY_TARGETS[policy]
        for target in coarse:
            tune(target)
        for target in _refined(coarse, grid):
            tune(target)
        grid.sort(key=lambda g: g["target"])
        meeting = [g for g in grid if g["meets_slo"]]
        best = (min(meeting, key=lambda g: g["replica_hours"]) if meeting
                else min(grid, key=lambda g: g["p95_ttft_s"]))
        out["policies"][policy] = {**best, "grid": [{k: g[k] for k in ("target", "replica_hours", "p95_ttft_s",
                                                                          "meets_slo")} for g in grid]}
    names = out["policies"]
    if "adapter-aware" in names and "queue" in names and names["queue"]["replica_hours"] > 0:
        out["saving"] = 1 - names["adapter-aware"]["replica_hours"] / names["queue"]["replica_hours"]
    return out
