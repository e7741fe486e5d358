"""`lorafleet demo` pieces: Redis found or started locally, else a one-line instruction; assets valid."""

from __future__ import annotations

import subprocess

import pytest
import redis
from lf_testing import free_port

from lorafleet.cluster.demo import DEMO_ADAPTERS, ensure_redis, prepare_assets
from lorafleet.infra.adapters import load_adapter_dir
from lorafleet.infra.base_spec import BaseModelSpec
from lorafleet.infra.errors import StoreUnavailable


def test_running_redis_is_used():
    assert ensure_redis("redis://127.0.0.1:6379/0") == "running"


def test_local_redis_server_is_started_when_none_answers():
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    try:
        assert ensure_redis(url) == "started"
        assert redis.Redis.from_url(url).ping()
    finally:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, timeout=10)


def test_without_redis_server_binary_a_clear_instruction(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(StoreUnavailable, match="redis-server is not installed: run `apt-get install redis-server`"):
        ensure_redis(f"redis://127.0.0.1:{free_port()}/0")


def test_demo_assets_validate(tmp_path):
    model_dir, adapters = prepare_assets(tmp_path)
    spec = BaseModelSpec.from_model_dir(model_dir)
    assert list(adapters) == [a[0] for a in DEMO_ADAPTERS]
    for (adapter_id, kind, rank, _), path in zip(DEMO_ADAPTERS, adapters.values(), strict=True):
        weights = load_adapter_dir(path, spec)
        assert weights.peft_type == kind.upper() and weights.max_rank == rank, adapter_id
