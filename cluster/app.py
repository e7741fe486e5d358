"""The Serve application builder: replicas + router ingress + placement controller, from Settings.

`serve run lorafleet.cluster.app:build_app` (or `serve run cluster/serve.yaml`, or `lorafleet serve`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from lorafleet.infra.config import Settings, load_settings
from lorafleet.infra.errors import ConfigError
from lorafleet.placement.controller import PlacementController
from lorafleet.replicas.deployment import ReplicaDeployment
from lorafleet.replicas.vllm_engine import vllm_env
from lorafleet.replicas.vllm_replica import VllmReplicaDeployment
from lorafleet.router.app import RouterDeployment

REQUEST_ROUTER_CLASS = "lorafleet.router.request_router:LoRAFleetRequestRouter"
# One controller per app; it only waits on Redis between periods, so it takes no CPU from the replicas.
PlacementDeployment = serve.deployment(name="placement", num_replicas=1,
                                       ray_actor_options={"num_cpus": 0})(PlacementController)


# settings.engine -> the replica deployment (same name, contract and options; README "vLLM replicas").
REPLICA_DEPLOYMENTS = {"lorafleet": ReplicaDeployment, "vllm": VllmReplicaDeployment}
PROJECT_ROOT = Path(__file__).resolve().parent.parent   # where `make` puts .venv-vllm (an editable install)


def vllm_python(settings: Settings) -> str | None:
    """Absolute path of the vLLM replicas' interpreter; None = this process's (an image with vllm installed)."""
    if settings.vllm_python == "":
        return None
    if settings.vllm_python is None:
        default = PROJECT_ROOT / ".venv-vllm" / "bin" / "python"
        return str(default) if default.is_file() else None
    path = Path(settings.vllm_python).expanduser().absolute()   # not resolve(): a venv's python is a symlink
    if not path.is_file():
        raise ConfigError(f"setting 'vllm_python': {path} not found (`make vllm-venv` builds .venv-vllm)")
    return str(path)


def engine_actor_options(settings: Settings) -> dict[str, Any]:
    """Ray actor options a replica's engine adds: for vLLM, its venv's interpreter (Ray's runtime_env
    py_executable; the same Ray version runs there) and its environment, sized from replica_num_cpus."""
    if settings.engine != "vllm":
        return {}
    runtime_env: dict[str, Any] = {"env_vars": vllm_env(settings.replica_num_cpus)}
    python = vllm_python(settings)
    if python is not None:
        runtime_env["py_executable"] = python
    return {"runtime_env": runtime_env}


ADAPTER_AWARE_POLICY = "lorafleet.cluster.autoscaling:AdapterAwarePolicy"


def replica_count_options(settings: Settings) -> dict[str, Any]:
    """A fixed num_replicas, or an autoscaling config: Serve's queue-length policy, or the adapter-aware one."""
    if settings.autoscaling == "off":
        return {"num_replicas": settings.num_replicas}
    config: dict[str, Any] = {
        "min_replicas": settings.min_replicas, "max_replicas": max(settings.max_replicas, settings.min_replicas),
        "initial_replicas": min(max(settings.num_replicas, settings.min_replicas), settings.max_replicas),
        "upscale_delay_s": settings.upscale_delay_s, "downscale_delay_s": settings.downscale_delay_s,
        "look_back_period_s": 15.0, "metrics_interval_s": 2.0,
    }
    if settings.autoscaling == "queue":   # a replica's running batch is its target: more queues up
        config["target_ongoing_requests"] = settings.max_num_seqs
    else:
        config["policy"] = {"policy_function": ADAPTER_AWARE_POLICY,
                            "policy_kwargs": {"target_utilization": settings.autoscale_target_utilization,
                                              "trend_damping": settings.autoscale_trend_damping,
                                              "trend_window_s": settings.autoscale_trend_window_s,
                                              "trend_lead_s": settings.autoscale_trend_lead_s}}
    return {"num_replicas": "auto", "autoscaling_config": config}


def build(settings: Settings) -> Application:
    """Bind the three deployments; settings travel as plain dicts so every process sees the same values."""
    overrides = settings.model_dump(mode="json")
    # Replica processes may start elsewhere than this one: the profile cache by an absolute path.
    overrides["profile_dir"] = str(Path(settings.profile_dir).resolve())
    router_config = RequestRouterConfig(
        request_router_class=REQUEST_ROUTER_CLASS,
        request_router_kwargs={"policy": settings.routing_policy, "redis_url": settings.redis_url,
                               "redis_prefix": settings.redis_prefix, "refresh_s": 1.0},
        request_routing_stats_period_s=1.0,
    )
    actor_options: dict[str, Any] = {"num_cpus": settings.replica_num_cpus, **engine_actor_options(settings)}
    if settings.replica_resources:
        actor_options["resources"] = dict(settings.replica_resources)
    head_options: dict[str, Any] = {"num_cpus": 0}
    if settings.router_resources:   # the ingress and the controller where the router resource is (the head)
        head_options["resources"] = dict(settings.router_resources)
    if settings.device.startswith("cuda"):
        actor_options["num_gpus"] = 1
    # Each replica takes its running batch plus a bounded engine queue; requests no replica has room for wait
    # in the router's handle queue up to max_queued_requests, then Serve's BackPressureError → 429.
    replicas = REPLICA_DEPLOYMENTS[settings.engine].options(
        ray_actor_options=actor_options, **replica_count_options(settings),
        max_ongoing_requests=settings.max_num_seqs + settings.replica_max_queued_requests,
        max_queued_requests=settings.max_queued_requests, request_router_config=router_config,
    ).bind(overrides)   # the replica builds its EngineConfig from the same Settings fields
    controller = PlacementDeployment.options(ray_actor_options=head_options).bind(overrides, settings.num_replicas)
    return RouterDeployment.options(num_replicas=settings.num_routers, ray_actor_options=head_options).bind(
        replicas, overrides, controller)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve app builder: `args` are Settings fields (from serve.yaml or `serve run ... key=value`)."""
    return build(load_settings(**(args or {})))
