"""The Serve application builder: replicas + router ingress + placement controller, from Settings.

`serve run lorafleet.cluster.app:build_app` (or `serve run cluster/serve.yaml`, or `lorafleet serve`).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from lorafleet.infra.config import Settings, load_settings
from lorafleet.placement.controller import PlacementController
from lorafleet.replicas.deployment import ReplicaDeployment
from lorafleet.router.app import RouterDeployment

REQUEST_ROUTER_CLASS = "lorafleet.router.request_router:LoRAFleetRequestRouter"
# One controller per app; it only waits on Redis between periods, so it takes no CPU from the replicas.
PlacementDeployment = serve.deployment(name="placement", num_replicas=1,
                                       ray_actor_options={"num_cpus": 0})(PlacementController)


def build(settings: Settings) -> Application:
    """Bind the three deployments; settings travel as plain dicts so every process sees the same values."""
    overrides = settings.model_dump(mode="json")
    router_config = RequestRouterConfig(
        request_router_class=REQUEST_ROUTER_CLASS,
        request_router_kwargs={"policy": settings.routing_policy, "redis_url": settings.redis_url,
                               "redis_prefix": settings.redis_prefix, "refresh_s": 1.0},
        request_routing_stats_period_s=1.0,
    )
    actor_options: dict[str, Any] = {"num_cpus": settings.replica_num_cpus}
    if settings.device.startswith("cuda"):
        actor_options["num_gpus"] = 1
    # Each replica takes its running batch plus a bounded engine queue; requests no replica has room for wait
    # in the router's handle queue up to max_queued_requests, then Serve's BackPressureError → 429.
    replicas = ReplicaDeployment.options(
        num_replicas=settings.num_replicas, ray_actor_options=actor_options,
        max_ongoing_requests=settings.max_num_seqs + settings.replica_max_queued_requests,
        max_queued_requests=settings.max_queued_requests, request_router_config=router_config,
    ).bind(overrides)   # the replica builds its EngineConfig from the same Settings fields
    controller = PlacementDeployment.bind(overrides, settings.num_replicas)
    return RouterDeployment.options(ray_actor_options={"num_cpus": 0}).bind(replicas, overrides, controller)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve app builder: `args` are Settings fields (from serve.yaml or `serve run ... key=value`)."""
    return build(load_settings(**(args or {})))
