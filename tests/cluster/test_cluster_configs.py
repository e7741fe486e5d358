"""cluster/cluster.yaml passes Ray's autoscaler validation; cluster/serve.yaml passes Serve's schema and
builds the application it names; the built app wires the project's RequestRouter and placement controller."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_cluster_yaml_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["cluster_name"] == "lorafleet"
    assert any("ray start --head" in cmd for cmd in config["head_start_ray_commands"])


def test_serve_yaml_is_valid_and_builds(tiny_model_dir):
    from ray.serve.schema import ServeDeploySchema

    from lorafleet.cluster.app import build_app
    from lorafleet.infra.config import Settings

    schema = ServeDeploySchema.model_validate(yaml.safe_load((CLUSTER / "serve.yaml").read_text()))
    (app,) = schema.applications
    assert app.import_path == "lorafleet.cluster.app:build_app"
    Settings(**app.args)  # every arg is a known, valid setting
    built = build_app({**app.args, "model_dir": str(tiny_model_dir), "device": "cpu"})
    assert built is not None


def _deployments(settings) -> dict:
    """name -> DeploymentSchema of the app `build(settings)` binds, as `serve build` finalises it (no Ray)."""
    from ray.serve._private.build_app import build_app as finalise
    from ray.serve.deployment import deployment_to_schema

    from lorafleet.cluster.app import build

    built = finalise(build(settings), name="lorafleet")
    assert built.ingress_deployment_name == "router"
    return {d.name: (d, deployment_to_schema(d)) for d in built.deployments}


def test_build_wires_the_projects_request_router_and_a_plain_placement_controller():
    from ray.serve.request_router import RequestRouter

    from lorafleet.infra.config import load_settings
    from lorafleet.placement.controller import PlacementController
    from lorafleet.router.request_router import LoRAFleetRequestRouter

    settings = load_settings(routing_policy="affinity", redis_prefix="lftest-build", num_replicas=3)
    deployments = _deployments(settings)
    assert set(deployments) == {"router", "replica", "placement"}

    _, replica = deployments["replica"]
    config = replica.request_router_config
    assert config.request_router_class == "lorafleet.router.request_router:LoRAFleetRequestRouter"
    module_name, _, class_name = config.request_router_class.partition(":")
    router_cls = getattr(importlib.import_module(module_name), class_name)
    assert router_cls is LoRAFleetRequestRouter and issubclass(router_cls, RequestRouter)
    assert config.get_request_router_class() is LoRAFleetRequestRouter   # what Serve itself resolves
    assert config.request_router_kwargs["policy"] == "affinity"
    assert config.request_router_kwargs["redis_prefix"] == "lftest-build"
    assert replica.num_replicas == 3

    controller, schema = deployments["placement"]
    assert controller.func_or_class is PlacementController   # the plain class, deployed by cluster/app.py
    assert schema.num_replicas == 1 and schema.ray_actor_options.num_cpus == 0
    assert controller.init_args[1] == 3 and controller.init_args[0]["redis_prefix"] == "lftest-build"
