"""The adapter-aware autoscaler's arithmetic, without Ray: the live Serve policy (cluster/autoscaling.py) and the
diurnal simulation (placement/autoscale_sim.py) size the fleet with this one function."""

from __future__ import annotations

from collections.abc import Sequence


def replicas_needed(stats: list[dict[str, float]], target_utilization: float) -> float | None:
    """Replica-equivalents the reported demand needs (fractional); None when no replica reports capacities.

    stats: one dict per replica with `capacity_r{c}` (tokens/s of rank class c at the SLO), `tokens_per_s_r{c}`
    (what it served of class c), `adapter_memory_bytes` and `active_adapter_bytes`. Rank classes are kept apart,
    as the rank-aware placement serves them: max(Σ_c demand_c / (capacity_c x target), active bytes / memory).
    """
    capacity: dict[int, float] = {}
    demand: dict[int, float] = {}
    memory = active_bytes = 0.0
    for replica in stats:
        for key, value in replica.items():
            if key.startswith("capacity_r"):
                rank = int(key[len("capacity_r"):])
                capacity[rank] = max(value, capacity.get(rank, 0.0))
            elif key.startswith("tokens_per_s_r"):
                rank = int(key[len("tokens_per_s_r"):])
                demand[rank] = demand.get(rank, 0.0) + value
        memory = max(memory, replica.get("adapter_memory_bytes", 0.0))
        active_bytes += replica.get("active_adapter_bytes", 0.0)
    if not capacity:
        return None
    for_tokens = sum(d / (capacity[rank] * target_utilization) for rank, d in demand.items()
                     if capacity.get(rank, 0) > 0)
    for_memory = active_bytes / memory if memory > 0 else 0.0
    return max(for_tokens, for_memory)


def trend_forecast(history: Sequence[tuple[float, float]], lead: float, damping: float) -> float:
    """Replicas needed `lead` time units after the last sample of `history` ((time, replicas needed) pairs, oldest
    first): the last need plus `damping` x the samples' least-squares slope x `lead`, never below 0.

    A fleet sized from what it saw last lags a rising day (and over-provisions a falling one) by one decision
    period; following the trend of the last few periods cancels most of that lag, so the same SLO holds at a
    higher target utilisation. damping 0 is the plain reactive policy; 1 follows a straight line fully. With fewer
    than two samples, or all at one time, the last need alone.
    """
    if not history:
        return 0.0
    last = history[-1][1]
    if damping <= 0 or len(history) < 2:
        return max(last, 0.0)
    times = [t for t, _ in history]
    mean_t = sum(times) / len(times)
    spread = sum((t - mean_t) ** 2 for t in times)
    if spread <= 0:
        return max(last, 0.0)
    mean_n = sum(n for _, n in history) / len(history)
    slope = sum((t - mean_t) * (n - mean_n) for t, n in history) / spread
    return max(last + damping * slope * lead, 0.0)
