"""Adapter-aware autoscaling: the policy's arithmetic (rank classes at their operating points, adapter bytes),
Serve's policy hook with real AutoscalingContexts, what a replica reports, and the controller following the count."""

from __future__ import annotations

import asyncio

import pytest
from lf_testing import make_adapters, seed_demand, simulated_points_file

from lorafleet.cluster.autoscaling import AdapterAwarePolicy
from lorafleet.infra.heartbeats import ReplicaLiveness
from lorafleet.infra.replica_api import GenerateRequest
from lorafleet.placement.autoscaling import replicas_needed
from lorafleet.placement.controller import PlacementController
from lorafleet.replicas import Engine
from lorafleet.replicas.deployment import ReplicaServer


def test_replicas_needed_keeps_rank_classes_at_their_own_operating_points():
    a = {"capacity_r8": 1000.0, "capacity_r64": 400.0, "tokens_per_s_r8": 700.0, "tokens_per_s_r64": 0.0}
    b = {"capacity_r8": 1000.0, "capacity_r64": 400.0, "tokens_per_s_r8": 0.0, "tokens_per_s_r64": 280.0}
    # 700 / (1000 x 0.7) + 280 / (400 x 0.7) = 1 + 1: two replicas, though either alone is "half busy"
    assert replicas_needed([a, b], 0.7) == pytest.approx(2.0)
    assert replicas_needed([{**a, "tokens_per_s_r8": 2800.0}, b], 0.7) == pytest.approx(5.0)
    memory = [{**a, "adapter_memory_bytes": 100.0, "active_adapter_bytes": 250.0}, {**b, "active_adapter_bytes": 90.0}]
    assert replicas_needed(memory, 0.7) == pytest.approx(3.4)   # the adapters' bytes need more than the tokens
    assert replicas_needed([{"queue_len": 3.0}], 0.7) is None   # no operating points reported yet


def context(stats: dict[str, dict[str, float]], current: int):
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    metrics: dict[str, dict[str, float]] = {}
    for replica, values in stats.items():
        for name, value in values.items():
            metrics.setdefault(name, {})[replica] = value
    return AutoscalingContext(
        deployment_id=DeploymentID("replica", "lorafleet"), deployment_name="replica", app_name="lorafleet",
        current_num_replicas=current, target_num_replicas=current, running_replicas=list(stats),
        total_num_requests=float(sum(v.get("queue_len", 0) for v in stats.values())), total_queued_requests=0.0,
        aggregated_metrics=metrics, raw_metrics=None, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2))


def test_the_serve_policy_hook_scales_on_demand_per_class_and_falls_back_to_queues():
    policy = AdapterAwarePolicy(target_utilization=0.5)
    busy = {"r0": {"capacity_r8": 1000.0, "tokens_per_s_r8": 900.0, "queue_len": 4.0},
            "r1": {"capacity_r8": 1000.0, "tokens_per_s_r8": 1100.0, "queue_len": 4.0}}
    desired, state = policy(context(busy, 2))
    assert desired == 4 and state["replicas_needed"] == pytest.approx(4.0)
    idle = {"r0": {"capacity_r8": 1000.0, "tokens_per_s_r8": 10.0}, "r1": {"capacity_r8": 1000.0}}
    assert policy(context(idle, 2))[0] == 1
    unknown = {"r0": {"queue_len": 8.0}, "r1": {"queue_len": 8.0}}   # no capacities yet: Serve's queue policy
    assert policy(context(unknown, 2))[0] > 2


def test_a_replica_reports_tokens_per_rank_class_and_its_adapters_bytes(tiny_model_dir, tmp_path):
    adapters = make_adapters(tmp_path, tiny_model_dir, {"low": ("lora", 4, ["q_proj"], 1),
                                                        "high": ("lora", 32, ["q_proj"], 2)})
    engine = Engine.from_pretrained(tiny_model_dir, kernel_backend="torch", max_rank=32, kv_cache_bytes=8 << 20)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    server = ReplicaServer(engine, owned=(engine,))
    server.capacity, server.adapter_memory_bytes = {8: 1000.0, 64: 400.0}, 10_000

    async def run(adapter: str | None) -> int:
        request = GenerateRequest("r-" + str(adapter), adapter, prompt="hello there", max_tokens=4)
        return [item async for item in server.generate(request)][-1].completion_tokens

    try:
        for adapter in ("low", "high", None):
            asyncio.run(run(adapter))
        stats = server.autoscaling_stats()
    finally:
        server.close()
    assert stats["capacity_r8"] == 1000.0 and stats["capacity_r64"] == 400.0
    assert stats["tokens_per_s_r8"] > 0 and stats["tokens_per_s_r64"] > 0   # base and r4 -> class 8, r32 -> 64
    assert stats["tokens_per_s_r8"] == pytest.approx(2 * stats["tokens_per_s_r64"], rel=0.5)
    sizes = {name: engine.adapters.facts(name)[1] for name in adapters}
    assert stats["active_adapter_bytes"] == sum(sizes.values()) and stats["adapter_memory_bytes"] == 10_000


def test_the_controller_follows_the_replica_count(redis_prefix, tmp_path):
    client, prefix = redis_prefix
    tables = seed_demand(client, prefix, 8, 3)
    settings = {"redis_prefix": prefix, "store_url": str(tmp_path / "store"), "rebalance_period_s": 3600.0,
                "operating_points": simulated_points_file(), "autoscaling": "adapter-aware"}
    controller = PlacementController(settings, num_replicas=2, start_loop=False)
    liveness = ReplicaLiveness(client, prefix)
    try:
        for rank in range(3):   # Serve scaled the deployment to three replicas
            liveness.beat(rank)
        assert controller.follow_replica_count() and controller.num_replicas == 3
        assert not controller.follow_replica_count()   # no change, no rebalance
        controller.rebalance()
        assert tables.load().num_replicas == 3
    finally:
        controller.stop()


def test_the_serve_policy_follows_the_demand_trend_through_its_state():
    policy = AdapterAwarePolicy(target_utilization=1.0, trend_damping=1.0, trend_window_s=60.0, trend_lead_s=10.0)

    def tick(tokens_per_s: float, now: float, state: dict) -> tuple[int, dict]:
        ctx = context({"r0": {"capacity_r8": 1000.0, "tokens_per_s_r8": tokens_per_s}}, 2)
        ctx.policy_state, ctx.current_time = state, now
        return policy(ctx)

    desired, state = tick(2000.0, 100.0, {})
    assert desired == 2 and state["history"] == [[100.0, 2.0]]   # one sample: no trend yet
    desired, state = tick(3000.0, 110.0, state)
    assert desired == 4 and state["forecast"] == pytest.approx(4.0)   # 3 + (0.1 replica/s x 10 s)
    desired, state = tick(3000.0, 200.0, state)   # the old samples left the 60 s window: flat again
    assert desired == 3 and len(state["history"]) == 1
    calm = AdapterAwarePolicy(target_utilization=1.0, trend_damping=0.0)
    ctx = context({"r0": {"capacity_r8": 1000.0, "tokens_per_s_r8": 3000.0}}, 2)
    ctx.policy_state, ctx.current_time = {"history": [[100.0, 1.0]]}, 110.0
    assert calm(ctx)[0] == 3   # damping 0: the reported demand alone
