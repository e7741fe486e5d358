"""Settings: defaults, env vars, YAML file, precedence, and clear errors naming the bad field."""

from __future__ import annotations

import pytest

from lorafleet.infra.config import Settings, load_settings
from lorafleet.infra.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("LORAFLEET_"):
            monkeypatch.delenv(key)


def test_defaults():
    settings = load_settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.max_rank == 128 and settings.routing_policy == "rank-aware"


def test_env_and_yaml_precedence(tmp_path, monkeypatch):
    path = tmp_path / "lorafleet.yaml"
    path.write_text("max_rank: 64\nnum_replicas: 4\nredis_prefix: from-yaml\n")
    monkeypatch.setenv("LORAFLEET_CONFIG", str(path))
    monkeypatch.setenv("LORAFLEET_NUM_REPLICAS", "8")
    settings = load_settings(redis_prefix="from-kwargs")
    assert settings.max_rank == 64  # YAML over default
    assert settings.num_replicas == 8  # env over YAML
    assert settings.redis_prefix == "from-kwargs"  # explicit over everything


@pytest.mark.parametrize("yaml_text,message", [
    ("max_rank: -1\n", "setting 'max_rank': Input should be greater than or equal to 1"),
    ("routing_policy: magic\n", "setting 'routing_policy'"),
    ("no_such_setting: 1\n", "setting 'no_such_setting': Extra inputs are not permitted"),
    ("redis_url: http://x\n", "setting 'redis_url'"),
    ("- a list\n", "top level must be a mapping"),
    ("max_rank: [\n", "not valid YAML"),
])
def test_bad_yaml_names_file_and_field(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_bad_env_var(monkeypatch):
    monkeypatch.setenv("LORAFLEET_MAX_RANK", "lots")
    with pytest.raises(ConfigError, match="setting 'max_rank'"):
        load_settings()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_settings_is_the_one_model():
    assert set(Settings.model_fields) >= {"redis_url", "store_url", "max_rank", "model_dir", "num_replicas"}
