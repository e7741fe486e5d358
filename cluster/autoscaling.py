"""Adapter-aware autoscaling of the replica deployment: a Ray Serve custom autoscaling policy.

Ray Serve's default policy scales on queue length; a LoRA fleet's capacity depends on which adapters a replica
serves (rank classes run at different operating points) and how many bytes of adapters it must hold. Each
replica reports (record_autoscaling_stats, replicas/deployment.py) the tokens/s it served per rank class over the
last window, the classes' operating points (the solver's capacity model, measured on the replica's engine) and the
bytes of the adapters it used. The replicas needed are

    max( Σ_c demand_c / (capacity_c x target_utilization),  Σ active adapter bytes / one replica's memory )

rounded up: rank classes kept apart, as the rank-aware placement serves them, and carried `trend_lead_s` ahead
along its least-squares trend over the last `trend_window_s` (damped by `trend_damping`; 0 = purely reactive):
a replica asked for now serves only after the upscale delay and its start, and on a rising day a fleet sized from
the last window is always one window short (placement.autoscaling.trend_forecast; the simulated day measures it).
Serve applies min/max_replicas and the up/down delays around it (the scale-down delay is the hysteresis). Before
any replica knows its operating points, the policy falls back to the queue length (Serve's own default).
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

from lorafleet.placement.autoscaling import replicas_needed, trend_forecast


def per_replica_stats(ctx: AutoscalingContext) -> list[dict[str, float]]:
    """{metric: value} per running replica from Serve's aggregated custom metrics."""
    metrics = ctx.aggregated_metrics or {}
    replicas: dict[Any, dict[str, float]] = {}
    for name, by_replica in metrics.items():
        for replica_id, value in by_replica.items():
            replicas.setdefault(replica_id, {})[name] = float(value)
    return list(replicas.values())


def adapter_aware_policy(ctx: AutoscalingContext, target_utilization: float = 0.7, trend_damping: float = 0.5,
                         trend_window_s: float = 60.0, trend_lead_s: float = 30.0) -> tuple[int, dict]:
    """Serve's policy hook: (desired replicas, policy state); see the module docstring. The state keeps the
    (time, replicas needed) samples of the last trend_window_s; Serve hands it back on the next call."""
    needed = replicas_needed(per_replica_stats(ctx), target_utilization)
    if needed is None:   # no operating points reported yet
        desired_by_queue, state = replica_queue_length_autoscaling_policy(ctx)
        return math.ceil(desired_by_queue), state
    now = ctx.current_time if ctx.current_time is not None else time.time()
    previous = (ctx.policy_state or {}).get("history", [])
    history = [(float(t), float(n)) for t, n in previous if now - trend_window_s <= t < now] + [(now, needed)]
    ahead = trend_forecast(history, trend_lead_s, trend_damping)
    desired = max(1, math.ceil(ahead - 1e-9))
    return desired, {"replicas_needed": needed, "forecast": ahead, "history": [list(h) for h in history]}


class AdapterAwarePolicy:
    """The policy with its settings (Serve builds it from policy_kwargs and calls it each control tick)."""

    def __init__(self, target_utilization: float = 0.7, trend_damping: float = 0.5, trend_window_s: float = 60.0,
                 trend_lead_s: float = 30.0) -> None:
        self.target_utilization = target_utilization
        self.trend = {"trend_damping": trend_damping, "trend_window_s": trend_window_s, "trend_lead_s": trend_lead_s}

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict]:
        return adapter_aware_policy(ctx, self.target_utilization, **self.trend)
