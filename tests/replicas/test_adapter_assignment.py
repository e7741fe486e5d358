"""Replicas act on the published routing table: the assigned adapters are prefetched to the host tier and installed
on the device as room allows, never evicting a pinned or an assigned adapter; unassigned ones are demoted lazily."""

from __future__ import annotations

import pytest
from lf_testing import make_adapters, wait_until

from lorafleet.infra.adapter_source import LocalDirSource
from lorafleet.infra.assignments import AssignmentReader, per_rank
from lorafleet.placement.routing_table import RoutingTable
from lorafleet.placement.table_store import RoutingTableStore
from lorafleet.replicas import Engine, SamplingParams
from lorafleet.replicas.deployment import ReplicaServer

ATTN = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("assigned")
    make_adapters(root, tiny_model_dir, {name: ("lora", 8, ATTN, seed) for seed, name in
                                         enumerate(("x", "y", "z", "w"))})
    return root


@pytest.fixture
def engine(tiny_model_dir, root):
    # Room for two rank-8 adapters on the device.
    with Engine.from_pretrained(tiny_model_dir, adapter_source=LocalDirSource(root), max_adapters=2, max_rank=8,
                                kernel_backend="torch", kv_cache_bytes=4 << 20) as engine:
        yield engine


def ready(engine, *ids):
    wait_until(lambda: all(engine.adapters.residency(a) in ("host", "device") for a in ids), 10, "fetched")


def test_assigned_adapters_are_fetched_then_installed(engine):
    assert engine.assign_adapters(["x", "y"]) == 2
    ready(engine, "x", "y")
    assert engine.adapters.residency("x") == "host"   # fetched; the device waits for a step or an install
    assert engine.install_assigned() == 2
    assert {engine.adapters.residency(a) for a in ("x", "y")} == {"device"}
    assert engine.adapters.info()["prefetch_installs"] == 2 and engine.adapters.info()["num_assigned"] == 2
    (out,) = engine.generate("hello", SamplingParams(max_tokens=2), "x")
    assert out.finish_reason == "length" and engine.adapters.stats["hits"] == 1   # no install at request time


def test_never_evicts_a_pinned_or_an_assigned_adapter_and_demotes_lazily(engine):
    pinned_slot = None
    engine.adapters.watch("x")
    ready(engine, "x")
    pinned_slot = engine.adapters.try_acquire("x")            # a running request holds x
    assert engine.assign_adapters(["y", "z"]) == 2            # room for one more: y (the larger share) first
    ready(engine, "y", "z")
    assert engine.install_assigned() == 1
    assert engine.adapters.residency("y") == "device" and engine.adapters.residency("z") == "host"
    assert engine.adapters.residency("x") == "device"          # pinned: kept
    engine.assign_adapters(["w"])                             # a new table: y and z no longer assigned
    assert engine.adapters.residency("y") == "device"          # demoted, not dropped
    ready(engine, "w")
    assert engine.install_assigned() == 1                     # evicts the demoted y, never the pinned x
    assert engine.adapters.residency("w") == "device" and engine.adapters.residency("y") == "host"
    assert engine.adapters.residency("x") == "device"
    engine.adapters.release("x", pinned_slot)
    engine.adapters.unwatch("x")
    engine.assign_adapters(["w", "z"])
    ready(engine, "z")
    assert engine.install_assigned() == 1 and engine.adapters.residency("x") == "host"   # unassigned x made room


def test_bad_ids_from_redis_are_ignored(engine):
    assert engine.assign_adapters(["../etc", "", "x" * 200, "y"]) == 1


def test_prefetch_stops_where_the_host_tier_is_full(engine):
    host = engine.adapters.host_cache_max_bytes
    sizes = {"x": host // 3, "y": host // 3, "z": host // 3, "w": host // 3}   # room for two (90% of the tier)
    assert engine.assign_adapters(["x", "y", "z", "w"], sizes) == 2
    ready(engine, "x", "y")
    assert engine.adapters.residency("z") == "cold" and engine.adapters.residency("w") == "cold"


def test_a_published_table_reaches_the_replica_of_its_rank(engine, redis_prefix):
    client, prefix = redis_prefix
    table = RoutingTableStore(client, prefix).publish(
        RoutingTable(2, {"x": ((1, 0.3), (0, 0.7)), "y": ((1, 1.0),), "z": ((0, 1.0),)}),
        homes={"w": 1, "z": 1}, sizes={"x": 10, "w": 30})
    reader = AssignmentReader(client, prefix)
    # The table's adapters by share, then the homes outside the table (z is in it: not repeated).
    assert reader.poll(1) == (table.version, [("y", 0), ("x", 10), ("w", 30)])
    assert reader.poll(1) is None                               # nothing new
    assert per_rank(table.entries, 2)["0"] == '[["z", 0], ["x", 0]]'
    server = ReplicaServer(engine, assignments=AssignmentReader(client, prefix))
    server.rank = 1
    assert server.sync_placement() and server.assignment_version == table.version
    ready(engine, "x", "y")
    server.sync_placement()   # idle engine: installs what is fetched
    assert {engine.adapters.residency(a) for a in ("x", "y")} == {"device"}
    assert engine.adapters.residency("z") == "cold"
