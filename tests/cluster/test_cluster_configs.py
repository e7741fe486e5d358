"""cluster/cluster.yaml passes Ray's autoscaler validation; cluster/serve.yaml passes Serve's schema and
builds the application it names."""

from __future__ import annotations

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
