"""The adapter-aware autoscaler's arithmetic, without Ray: the live Serve policy (cluster/autoscaling.py) and the
diurnal simulation (placement/autoscale_sim.py) size the fleet with this one function."""

from __future__ import annotations


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
