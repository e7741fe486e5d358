"""engine: vllm without vLLM itself: settings, rank classes from the published table, the replica's Ray options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorafleet.cluster.app import REPLICA_DEPLOYMENTS, engine_actor_options, vllm_python
from lorafleet.infra.config import load_settings
from lorafleet.infra.errors import ConfigError, UnsupportedAdapter, error_for_code
from lorafleet.placement.table_store import RoutingTableStore
from lorafleet.replicas.vllm_engine import VllmConfig, lora_rank_class
from lorafleet.replicas.vllm_replica import RankClass


def test_the_replicas_package_imports_without_vllm():
    assert "vllm" not in sys.modules   # vllm_engine / vllm_replica were imported above (tests/ must hold no "vllm")


@pytest.mark.parametrize("rank,expected", [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (65, 128), (300, 320)])
def test_rank_classes_round_up_to_what_vllm_accepts(rank, expected):
    assert lora_rank_class(rank) == expected
    with pytest.raises(ValueError):
        lora_rank_class(513)


def test_settings_pick_the_engine_and_check_vllm_fields():
    settings = load_settings(engine="vllm", vllm_lora_target_modules=["q_proj", "v_proj"], max_adapters=3,
                             max_num_seqs=8, vllm_max_lora_rank=16)
    config = VllmConfig.from_settings(settings, 16)
    assert (config.max_loras, config.max_cpu_loras, config.target_modules) == (4, 4, ("q_proj", "v_proj"))
    for bad in ({"engine": "trt"}, {"vllm_lora_target_modules": ["lm_head"]}, {"vllm_lora_target_modules": []},
                {"vllm_max_lora_rank": 0}):
        with pytest.raises(ConfigError):
            load_settings(**bad)
    assert isinstance(error_for_code("unsupported_adapter", "x"), UnsupportedAdapter)
    assert UnsupportedAdapter.http_status == 400


def test_rank_class_follows_the_published_table(redis_prefix):
    client, prefix = redis_prefix
    classes = RankClass(client, prefix, max_rank=64)
    assert classes.wanted(0) == 64   # no table yet: max_rank's
    client.set(f"{prefix}:routing_table", json.dumps({"entries": {}, "meta": {"replica_max_rank": [8, 0, 16, 2]}}))
    assert [classes.wanted(r) for r in range(5)] == [8, 64, 16, 8, 64]   # 0 / missing: nothing placed there
    assert RankClass(client, prefix, max_rank=64, fixed=64).wanted(0) == 64


def test_vllm_replicas_run_with_the_vllm_venv_and_its_environment(tmp_path):
    assert engine_actor_options(load_settings()) == {}
    settings = load_settings(engine="vllm", replica_num_cpus=2, kv_cache_bytes=64 << 20)
    runtime_env = engine_actor_options(settings)["runtime_env"]
    assert runtime_env["env_vars"] == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                       "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": "2"}
    default = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    assert runtime_env.get("py_executable") == (str(default) if default.is_file() else None)
    assert vllm_python(load_settings(vllm_python="")) is None
    python = tmp_path / "python"
    python.write_text("")
    assert vllm_python(load_settings(vllm_python=str(python))) == str(python)
    with pytest.raises(ConfigError, match="vllm_python"):
        vllm_python(load_settings(vllm_python=str(tmp_path / "missing")))
    assert REPLICA_DEPLOYMENTS["vllm"].name == REPLICA_DEPLOYMENTS["lorafleet"].name == "replica"


@pytest.mark.parametrize("engine", ["vllm", "lorafleet"])
def test_placement_never_puts_flora_or_ia3_on_vllm_replicas(engine, tmp_path, tiny_model_dir, redis_prefix):
    """Every adapter has demand (e.g. counted before the deployment switched engines); with engine: vllm the
    rebalance places only the LoRA ones, in the table and in each replica's prefetch list."""
    from lf_testing import REDIS_URL, make_adapters, simulated_points_file

    from lorafleet.infra.assignments import AssignmentReader
    from lorafleet.infra.demand import DemandCounters
    from lorafleet.infra.store import AdapterStore
    from lorafleet.placement.rebalancer import Rebalancer

    client, prefix = redis_prefix
    settings = load_settings(engine=engine, model_dir=str(tiny_model_dir), store_url=str(tmp_path / "store"),
                             redis_url=REDIS_URL, redis_prefix=prefix, max_rank=64, rebalance_period_s=10.0,
                             operating_points=simulated_points_file())
    store = AdapterStore.from_settings(settings)
    made = make_adapters(tmp_path / "adapters", tiny_model_dir,
                         {"lora-r8": ("lora", 8, ["q_proj"], 1), "lora-r32": ("lora", 32, ["v_proj"], 2),
                          "flora-r8": ("flora", 8, ["q_proj"], 3), "ia3": ("ia3", 1, ["k_proj"], 4)})
    counters = DemandCounters(client, prefix)
    for adapter_id, path in made.items():
        store.push(adapter_id, path)
        counters.record(adapter_id, 5000, num_requests=50)
    counters.record("flora-gone", 5000, num_requests=50)   # demand for an adapter the store no longer has
    Rebalancer.from_settings(settings).run(2, live_ranks=[0, 1])
    table = RoutingTableStore(client, prefix).load()
    assigned = set()
    for rank in (0, 1):   # each replica's prefetch list (a fresh reader sees the current one)
        update = AssignmentReader(client, prefix).poll(rank)
        assigned |= {a for a, _ in (update[1] if update else [])}
    placed = set(table.entries) | assigned
    assert {"lora-r8", "lora-r32"} <= placed
    if engine == "vllm":
        assert not placed & {"flora-r8", "ia3"}, placed
    else:   # the LoRAFleet engine runs them all
        assert {"flora-r8", "ia3"} <= placed


def test_the_live_benchmarks_table_starts_its_replicas_at_classes_16_and_64(redis_prefix):
    """cluster/demo_target.vllm_fleet publishes this table before its replicas start: rank <= 16 adapters on both
    replicas (mostly the class-16 one), the others on the class-64 one only; each replica reads its class from it."""
    from lorafleet.cluster.demo_target import VLLM_FLEET_RANKS, VLLM_FLEET_SHARE, rank_class_table, uniform_table

    client, prefix = redis_prefix
    ranks = {f"a{i}-r{r}": r for i, r in enumerate(VLLM_FLEET_RANKS)}
    assert sum(r <= 16 for r in ranks.values()) / len(ranks) >= 0.7   # the traffic mix, uniform popularity
    table = rank_class_table(ranks)
    for adapter_id, rank in ranks.items():
        replicas = dict(table.entries[adapter_id])
        assert replicas == ({0: VLLM_FLEET_SHARE, 1: round(1 - VLLM_FLEET_SHARE, 6)} if rank <= 16 else {1: 1.0}), \
            adapter_id
    assert 0.9 < VLLM_FLEET_SHARE < 1   # most low-rank traffic on the class-16 replica (vllm_fleet_costs.py)
    plain = uniform_table(ranks, 64)
    assert all(dict(plain.entries[a]) == {0: 0.5, 1: 0.5} for a in ranks)
    assert plain.meta["replica_max_rank"] == [64, 64]
    RoutingTableStore(client, prefix).publish(table)
    classes = RankClass(client, prefix, max_rank=64)
    assert [classes.wanted(0), classes.wanted(1)] == [16, 64]
    assert RankClass(client, prefix, max_rank=64, fixed=64).wanted(0) == 64   # the plain-vLLM baseline
