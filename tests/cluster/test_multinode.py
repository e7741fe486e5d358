"""LoRAFleet on a real multi-node Ray cluster on this machine: a head and three worker raylets (`ray start`), the app
deployed the way users do (`serve deploy` of cluster/serve.yaml with their edits), the ingress and the placement
controller on the head, replicas on workers by a custom resource; then faults at node and actor level."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from lf_testing import (
    REDIS_URL,
    LocalRayCluster,
    delete_prefix,
    free_port,
    healthz_ok,
    simulated_points_file,
    wait_until,
)

from lorafleet.cluster.demo import prepare_assets
from lorafleet.infra.config import load_settings
from lorafleet.infra.store import AdapterStore
from lorafleet.placement.routing_table import RoutingTable, default_replica
from lorafleet.placement.table_store import RoutingTableStore
from lorafleet.router.app import REPLICA_HEADER, ROUTER_HEADER

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
NUM_WORKERS = 3   # two replicas and a spare node for Serve to restart one on


@pytest.fixture(scope="module")
def cluster():
    workers = [{"lorafleet_replica": 1, f"worker{i}": 1} for i in range(NUM_WORKERS)]
    ray_cluster = LocalRayCluster(head_resources={"lorafleet_head": 1}, worker_resources=workers).start()
    try:
        yield ray_cluster
    finally:
        ray_cluster.stop()


@pytest.fixture(scope="module")
def app(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    model_dir, adapters = prepare_assets(root)
    prefix, port = f"lftest-{uuid.uuid4().hex[:10]}", free_port()
    args = {   # the edits a user makes to cluster/serve.yaml for this cluster
        "model_dir": str(model_dir), "base_model_name": "tiny", "device": "cpu", "dtype": "float32",
        "num_replicas": 2, "num_routers": 2, "replica_num_cpus": 1, "max_adapters": 8, "max_rank": 64,
        "max_num_seqs": 16, "kv_cache_bytes": 32 << 20, "redis_url": REDIS_URL, "redis_prefix": prefix,
        "store_url": str(root / "store"), "replica_resources": {"lorafleet_replica": 1},
        "router_resources": {"lorafleet_head": 0.01}, "rebalance_period_s": 3600,
        "operating_points": simulated_points_file(), "profile_dir": str(root / "profiles"),
    }
    config = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"].update(args)
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    store_args = ("redis_url", "redis_prefix", "store_url", "model_dir")
    store = AdapterStore.from_settings(load_settings(**{k: v for k, v in args.items() if k in store_args}))
    for adapter_id, adapter_dir in adapters.items():
        store.push(adapter_id, adapter_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        cluster.run("serve", "deploy", str(path), "--address", cluster.dashboard)
        wait_until(lambda: _running(cluster) == {"replica": 2, "router": 2, "placement": 1}, 240, "the app runs")
        wait_until(lambda: healthz_ok(url), 60, "HTTP answers")
        yield url, prefix
    finally:
        delete_prefix(redis.Redis.from_url(REDIS_URL), prefix)


def _running(cluster: LocalRayCluster) -> dict[str, int]:
    status = yaml.safe_load(cluster.run("serve", "status", "--address", cluster.dashboard))
    deployments = (status.get("applications") or {}).get("lorafleet", {}).get("deployments", {})
    return {name: d.get("replica_states", {}).get("RUNNING", 0) for name, d in deployments.items()}


def _actors(cluster: LocalRayCluster) -> list[dict]:
    """Alive Serve replica actors of the app: {deployment, pid, node_id}."""
    actors = json.loads(cluster.run("ray", "list", "actors", "--detail", "--format", "json", "--limit", "1000",
                                    "--address", cluster.address))
    out = []
    for actor in actors:
        name = actor.get("class_name") or ""
        if actor.get("state") == "ALIVE" and name.startswith("ServeReplica:lorafleet:"):
            out.append({"deployment": name.split(":")[-1], "pid": actor["pid"], "node_id": actor["node_id"]})
    return out


def _nodes(cluster: LocalRayCluster) -> dict[str, str]:
    """node id -> 'head' or 'worker<i>' (from each node's own resource)."""
    nodes = json.loads(cluster.run("ray", "list", "nodes", "--detail", "--format", "json", "--address",
                                   cluster.address))
    out = {}
    for node in nodes:
        resources = node.get("resources_total") or {}
        names = [k for k in resources if k.startswith("worker") or k == "lorafleet_head"]
        out[node["node_id"]] = "head" if "lorafleet_head" in names else (names[0] if names else "?")
    return out


def _complete(url: str, model: str, timeout_s: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=timeout_s,
                      json={"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0})


def _pin(prefix: str, entries: dict, url: str | None = None) -> RoutingTable:
    """Publish a table; with `url`, wait until routing follows its pinned (p = 1) entries: each router's request
    router re-reads the table within 1 s, which four raylets on two loaded cores sometimes stretch."""
    table = RoutingTableStore(redis.Redis.from_url(REDIS_URL), prefix).publish(RoutingTable(2, entries))
    pinned = [(a, entry[0][0]) for a, entry in entries.items() if len(entry) == 1]
    if url is None or not pinned:
        time.sleep(2.5)
        return table

    def follows() -> bool:
        requests = [pinned[i % len(pinned)] for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda request: _complete(url, request[0]), requests))
        return all(r.status_code == 200 and int(r.headers[REPLICA_HEADER]) == rank
                   for (_, rank), r in zip(requests, responses, strict=True))

    wait_until(follows, 60, "routing by the new table", period_s=0.5)
    return table


def test_the_ingress_and_controller_run_on_the_head_and_replicas_on_workers(app, cluster):
    nodes = _nodes(cluster)
    where = collections.defaultdict(set)
    for actor in _actors(cluster):
        where[actor["deployment"]].add(nodes[actor["node_id"]])
    assert where["router"] == {"head"} and where["placement"] == {"head"}
    assert len(where["replica"]) == 2 and all(n.startswith("worker") for n in where["replica"])


def test_two_routers_route_by_the_same_table(app):
    url, prefix = app
    pinned = {a: r for a, r in (("tenant01-lora-r1", 1), ("tenant02-lora-r2", 0))}
    assert all(default_replica(a, 2) != r for a, r in pinned.items())   # hashing would send them elsewhere
    _pin(prefix, {a: ((r, 1.0),) for a, r in pinned.items()}, url)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: (i % 2, _complete(url, list(pinned)[i % 2])), range(40)))
    routers = collections.Counter(r.headers[ROUTER_HEADER] for _, r in responses)
    assert len(routers) == 2, routers   # the proxy spread requests over both ingress replicas
    assert all(response.status_code == 200 for _, response in responses)
    targets = list(pinned.values())
    on_table = collections.Counter((r.headers[ROUTER_HEADER], int(r.headers[REPLICA_HEADER]) == targets[i])
                                   for i, r in responses)
    # Both routers follow the table (hashing would send every request elsewhere). Serve leaves the table's replica
    # for the fallback tier when its queue-length probe misses the 0.1 s deadline, which four raylets on two
    # shared cores sometimes do: a few requests, not the routing.
    for router in routers:
        assert on_table[router, True] >= 0.85 * routers[router], on_table


def test_the_placement_controller_killed_routing_keeps_the_table_and_it_comes_back(app, cluster):
    url, prefix = app
    _pin(prefix, {"tenant07-lora-r64": ((1, 1.0),)}, url)
    (controller,) = [a for a in _actors(cluster) if a["deployment"] == "placement"]
    import psutil

    psutil.Process(controller["pid"]).kill()
    for _ in range(6):   # routing does not need the controller: the last table keeps serving
        response = _complete(url, "tenant07-lora-r64")
        assert response.status_code == 200 and response.headers[REPLICA_HEADER] == "1"

    def rebalanced() -> bool:
        response = httpx.post(f"{url}/v1/placement/rebalance", timeout=60)
        return response.status_code == 200 and response.json().get("published") is True

    wait_until(rebalanced, 120, "Serve restarted the controller and it rebalances again", period_s=2.0)
    assert [a["pid"] for a in _actors(cluster) if a["deployment"] == "placement"] != [controller["pid"]]


def test_one_of_two_routers_killed_requests_go_on(app, cluster):
    url, _ = app
    victim = next(a for a in _actors(cluster) if a["deployment"] == "router")
    import psutil

    psutil.Process(victim["pid"]).kill()
    statuses = [_complete(url, "tiny").status_code for _ in range(20)]
    # Requests in flight on the killed router may fail; nothing answers 500, and the other router serves.
    assert 500 not in statuses and statuses.count(200) >= 15, statuses
    wait_until(lambda: _running(cluster).get("router") == 2, 120, "Serve replaced the router")
    assert all(_complete(url, "tiny").status_code == 200 for _ in range(6))


def test_a_worker_node_killed_under_load(app, cluster):
    """Only requests in flight on that node fail (503 in OpenAI's shape); Serve restarts its replica on the spare
    node; a second node lost with no spare leaves its rank dead, and the next rebalance places nothing there."""
    url, prefix = app
    _pin(prefix, {"tenant01-lora-r1": ((0, 0.5), (1, 0.5))})
    nodes = _nodes(cluster)
    victim_node = next(a["node_id"] for a in _actors(cluster) if a["deployment"] == "replica")
    victim = int(nodes[victim_node].removeprefix("worker"))
    results: list[int] = []

    def load(stop_at: float) -> None:
        while time.monotonic() < stop_at:
            results.append(_complete(url, "tenant01-lora-r1", timeout_s=120).status_code)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        stop_at = time.monotonic() + 20
        futures = [pool.submit(load, stop_at) for _ in range(4)]
        time.sleep(5)
        cluster.kill_worker(victim)
        for future in futures:
            future.result()
    counts = collections.Counter(results)
    assert set(counts) <= {200, 503} and counts[200] > 0, counts
    assert counts[503] <= 8, counts   # in flight there (4 clients), and a retry window while Serve noticed
    wait_until(lambda: _running(cluster).get("replica") == 2, 240, "Serve restarted the replica on the spare node")
    assert all(_complete(url, "tenant01-lora-r1").status_code == 200 for _ in range(6))
    # A second node dies with no spare left: its rank stays dead, the rebalance drops it.
    survivors = {int(nodes[a["node_id"]].removeprefix("worker")) for a in _actors(cluster)
                 if a["deployment"] == "replica"}
    second = sorted(survivors)[0]
    cluster.kill_worker(second)
    reports = []

    def rebalanced_without_it() -> bool:   # its heartbeat expires 10 s (the TTL) after the kill, later on a slow box
        reports.append(httpx.post(f"{url}/v1/placement/rebalance", timeout=60).json())
        return len(reports[-1].get("dead_replicas", [])) >= 1

    wait_until(rebalanced_without_it, 90, "a rebalance that finds the dead rank", period_s=3.0)
    report = reports[-1]
    assert len(report["dead_replicas"]) == 1, report
    dead = report["dead_replicas"][0]
    table = RoutingTableStore(redis.Redis.from_url(REDIS_URL), prefix).load()
    assert all(rank != dead for entry in table.entries.values() for rank, _ in entry)
    assert all(_complete(url, "tenant01-lora-r1").status_code == 200 for _ in range(4))
