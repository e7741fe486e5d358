"""The engine measures its own operating points (the solver's capacities), cached per model and settings."""

from __future__ import annotations

import pytest

from lorafleet.infra.capacity_store import CapacityStore
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.replicas import Engine, profiler
from lorafleet.replicas.profiler import ProfileSpec, cache_key, ensure_profile, profile_engine

SPEC = ProfileSpec(ranks=(8, 16), prompt_tokens=16, output_tokens=4, max_batch=4, slo_ttft_s=5.0, slo_tpot_s=1.0)


@pytest.fixture
def engine(tiny_model_dir):
    with Engine.from_pretrained(tiny_model_dir, max_num_seqs=4, max_rank=16, max_adapters=4,
                                kernel_backend="torch", kv_cache_bytes=8 << 20) as engine:
        yield engine


def test_profile_is_an_operating_points_document_for_the_solver(engine):
    doc = profile_engine(engine, SPEC)
    points = OperatingPoints.from_dict(doc)
    assert points.rank_classes == (8, 16) and all(points.points[r] > 0 for r in (8, 16))
    assert set(doc["probes"]) >= {"r8-b1", "r8-b2", "r8-b4", "r16-b1"} and doc["is_slo_met"]
    assert points.max_adapter_bytes == engine.config.host_cache_max_bytes   # what a replica holds ready
    assert doc["device_pool_rows"] == engine.config.num_pool_rows
    assert engine.adapters.info()["num_resident"] == 0 or not any(
        a.startswith("profile-") for a in engine.adapters.info()["resident"])   # probe adapters unloaded


def test_first_start_profiles_once_then_reuses_the_cache_and_redis(engine, redis_prefix, tmp_path, monkeypatch):
    client, prefix = redis_prefix
    calls = []
    real = profiler.profile_engine
    monkeypatch.setattr(profiler, "profile_engine", lambda e, s: calls.append(s) or real(e, s))
    first = ensure_profile(engine, CapacityStore(client, prefix), tmp_path, SPEC)
    assert len(calls) == 1 and first["key"] == cache_key(engine, SPEC)
    assert CapacityStore(client, prefix).get()["file"] == first["file"] == str(tmp_path / f"{first['key']}.json")
    assert ensure_profile(engine, CapacityStore(client, prefix), tmp_path, SPEC)["key"] == first["key"]
    client.delete(f"{prefix}:placement:operating_points")   # Redis lost it: the cached file answers
    again = ensure_profile(engine, CapacityStore(client, prefix), tmp_path, SPEC)
    assert len(calls) == 1 and again["points"] == first["points"]
    other = ProfileSpec(ranks=(8,), prompt_tokens=16, output_tokens=4, max_batch=2, slo_ttft_s=5.0, slo_tpot_s=1.0)
    assert cache_key(engine, other) != first["key"]   # other settings: measured again
    ensure_profile(engine, CapacityStore(client, prefix), tmp_path, other)
    assert len(calls) == 2
