"""A local demo app to load-test (tiny model, 20 demo adapters), in this process, with a chosen routing policy.

`lorafleet loadtest --policy-compare` / `--sweep` without --host hand `local_demo` to the load-test runner
(loadtests/ knows nothing of the cluster). The demo adapters' ids carry their ranks (`-r16`, `ia3`), so the
load-test report reads every rank class from the ids.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def delete_prefix(redis_url: str, prefix: str) -> None:
    from lorafleet.infra.redis_conn import connect

    client = connect(redis_url)
    for key in client.scan_iter(f"{prefix}:*", count=1000):
        client.delete(key)


FLEET_RANKS = (8, 8, 16, 16, 32, 64)   # rank mix of the fleet (weights by repetition)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare_fleet(root: Path, model_dir: Path, num_adapters: int) -> dict[str, Path]:
    """`num_adapters` LoRA adapters of mixed ranks for a placement load test (made once, reused): ids carry their
    rank (`fleet007-lora-r32`) so the load-test report reads the rank classes from them."""
    from lorafleet.infra.adapter_maker import make_adapter

    adapters = {}
    for i in range(num_adapters):
        rank = FLEET_RANKS[i % len(FLEET_RANKS)]
        adapter_id = f"fleet{i:03d}-lora-r{rank}"
        path = root / "adapters" / "fleet" / adapter_id
        if not (path / "adapter_model.safetensors").is_file():
            make_adapter(path, model_dir, "lora", rank, ALL_LINEAR, seed=1000 + i)
        adapters[adapter_id] = path
    return adapters


@contextmanager
def local_demo(root: Path, policy: str = "rank-aware", num_adapters: int = 20, *, port: int | None = None,
               redis_url: str | None = None, num_replicas: int = 2, num_cpus: int = 2,
               warmup_requests: int = 8) -> Iterator[str]:
    """Serve the demo on 127.0.0.1 under a fresh Redis key prefix (deleted on exit); yield its base URL.

    Up to 20 adapters: the tiny demo's (cluster/demo.py), with its settings. More: a fleet of that many LoRA
    adapters of ranks 8-64 whose working set is many times one replica's device pool (8 slots, 512 rows) and about
    twice its host tier, the setting where placement matters: with random routing every replica needs every
    adapter, with the rank-aware table each needs its share. A 1-hour rebalance period either way, so a
    comparison's runs start from the same state (the load test rebalances after its warm-up).
    """
    import httpx

    from lorafleet.cluster.demo import DEMO_ADAPTERS, ensure_redis, prepare_assets
    from lorafleet.cluster.serving import serve_app
    from lorafleet.infra.config import load_settings
    from lorafleet.infra.store import AdapterStore

    base = load_settings(**({"redis_url": redis_url} if redis_url else {}))
    ensure_redis(base.redis_url)
    model_dir, adapters = prepare_assets(root)
    extra: dict = {}
    if num_adapters > len(DEMO_ADAPTERS):
        adapters = prepare_fleet(root, model_dir, num_adapters)
        total = sum((p / "adapter_model.safetensors").stat().st_size for p in adapters.values())
        extra = {"host_cache_max_bytes": int(0.55 * total)}
    prefix = f"lfload-{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        model_dir=str(model_dir.resolve()), store_url=str((root / "store").resolve()), redis_url=base.redis_url,
        redis_prefix=prefix, num_replicas=num_replicas, routing_policy=policy, http_port=port or free_port(),
        base_model_name="tiny", max_num_seqs=16, max_batched_tokens=512, kv_cache_bytes=32 << 20, max_adapters=8,
        max_rank=64, rebalance_period_s=3600.0, **extra,
    )
    try:
        store = AdapterStore.from_settings(settings)
        for adapter_id, path in adapters.items():
            store.push(adapter_id, path, owner="loadtest", if_changed=True)
        with serve_app(settings, num_cpus=num_cpus) as url:
            with httpx.Client(timeout=120) as client:  # first requests pay one-off costs: keep them out
                for i in range(warmup_requests):
                    client.post(f"{url}/v1/completions",
                                json={"model": "tiny", "prompt": f"warm up {i}", "max_tokens": 4})
            yield url
    finally:
        delete_prefix(base.redis_url, prefix)


# The live vLLM benchmark's fleet (RESULTS.md "vLLM replicas (live, Locust)"): LoRA adapters on every linear module
# (PEFT's "all-linear") of the `small` preset cut to 2 layers; with uniform popularity 10 of 12 adapters, 83 % of the
# traffic, have rank <= 16. Rank classes: replica 0 runs class 16 (ranks 8 and 16), replica 1 class 64 (ranks 32 and
# 64, and a small share of the low ranks). VLLM_FLEET_SHARE is the low ranks' weight on replica 0, from what a request
# costs each (benchmarks/vllm_fleet_costs.py, RESULTS.md): a rank <= 16 request of the benchmark's default 8 output
# tokens takes 4.3x the CPU time at max_lora_rank 64 as at 16, so balancing the two replicas' loads leaves ~2.5 % of
# the low ranks' traffic to replica 1 (0.8, the share before that was measured, sent 20 % there and made replica 1
# the fleet's bottleneck). Longer outputs shift the costs toward rank-independent per-step work and want a lower
# share (RESULTS.md, run F).
VLLM_FLEET_RANKS = (8, 8, 8, 8, 8, 8, 8, 16, 16, 16, 32, 64)
VLLM_FLEET_MODULES = ALL_LINEAR
VLLM_FLEET_CLASSES = (16, 64)
VLLM_FLEET_SHARE = 0.975


VLLM_FLEET_LAYERS = 2   # of the `small` preset's 14: its layer shapes at 1/7 of the time per step (2 shared cores)


def prepare_vllm_fleet(root: Path) -> tuple[Path, dict[str, Path]]:
    """The `small` preset's first VLLM_FLEET_LAYERS layers and VLLM_FLEET_RANKS adapters under root (made once)."""
    import json

    from safetensors.torch import load_file, save_file

    from lorafleet.infra.adapter_maker import make_adapter
    from lorafleet.replicas.checkpoint import make_model

    model_dir = root / "models" / f"small-{VLLM_FLEET_LAYERS}l"
    if not (model_dir / "config.json").is_file():
        make_model(model_dir, "small", seed=0)
        weights = model_dir / "model.safetensors"
        state = {k: v for k, v in load_file(str(weights)).items()
                 if not k.startswith("model.layers.") or int(k.split(".")[2]) < VLLM_FLEET_LAYERS}
        save_file(state, str(weights), metadata={"format": "pt"})
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": VLLM_FLEET_LAYERS}))
    adapters = {}
    for i, rank in enumerate(VLLM_FLEET_RANKS):
        adapter_id = f"vfleet{i:02d}-lora-r{rank}"
        path = root / "adapters" / "vllm-fleet" / adapter_id
        if not (path / "adapter_model.safetensors").is_file():
            make_adapter(path, model_dir, "lora", rank, VLLM_FLEET_MODULES, seed=2000 + i)
        adapters[adapter_id] = path
    return model_dir, adapters


def rank_class_table(adapter_ranks: dict[str, int]):
    """The routing table of the benchmark's two rank classes (meta.replica_max_rank = VLLM_FLEET_CLASSES): adapters
    of the low class on both replicas (VLLM_FLEET_SHARE on replica 0; the router takes the shorter queue of two
    weighted draws), the others on the class-64 replica only."""
    from lorafleet.placement.routing_table import RoutingTable

    low = VLLM_FLEET_CLASSES[0]
    entries = {a: ((0, VLLM_FLEET_SHARE), (1, round(1 - VLLM_FLEET_SHARE, 6))) if r <= low else ((1, 1.0),)
               for a, r in adapter_ranks.items()}
    return RoutingTable(2, entries, meta={"replica_max_rank": list(VLLM_FLEET_CLASSES)})


def uniform_table(adapter_ranks: dict[str, int], max_lora_rank: int):
    """The plain vLLM fleet's table (every replica at one max_lora_rank, so nothing to separate): every adapter on
    both replicas at equal weight, the router's two-choice draw balancing their queues."""
    from lorafleet.placement.routing_table import RoutingTable

    entries = {a: ((0, 0.5), (1, 0.5)) for a in adapter_ranks}
    return RoutingTable(2, entries, meta={"replica_max_rank": [max_lora_rank, max_lora_rank]})


@contextmanager
def vllm_fleet(root: Path, policy: str = "rank-aware", num_adapters: int = len(VLLM_FLEET_RANKS), *,
               max_lora_rank: int | None = None, port: int | None = None, redis_url: str | None = None,
               warmup_requests: int = 8) -> Iterator[str]:
    """Two vLLM replicas (1 CPU, 1 OpenMP thread each) of the 2-layer `small` model behind the router, on 127.0.0.1
    under a fresh Redis key prefix; yield the base URL. The rank-class table is published before the replicas start, so
    each starts at its class (max_lora_rank 16 and 64); `max_lora_rank` instead runs every replica at that one value
    (a plain vLLM fleet) under uniform_table. Rebalancing is off (1-hour period): each table stays as published."""
    import httpx
    import redis as redis_lib

    from lorafleet.cluster.demo import ensure_redis
    from lorafleet.cluster.serving import serve_app
    from lorafleet.infra.config import load_settings
    from lorafleet.infra.store import AdapterStore
    from lorafleet.placement.table_store import RoutingTableStore

    base = load_settings(**({"redis_url": redis_url} if redis_url else {}))
    ensure_redis(base.redis_url)
    model_dir, adapters = prepare_vllm_fleet(root)
    adapters = dict(list(adapters.items())[:num_adapters])
    prefix = f"lfload-{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        engine="vllm", model_dir=str(model_dir.resolve()), store_url=str((root / "store").resolve()),
        redis_url=base.redis_url, redis_prefix=prefix, num_replicas=2, replica_num_cpus=1, routing_policy=policy,
        http_port=port or free_port(), base_model_name="small", max_num_seqs=8, replica_max_queued_requests=32,
        max_batched_tokens=512, kv_cache_bytes=128 << 20, max_adapters=len(adapters), max_rank=64,
        vllm_lora_target_modules=VLLM_FLEET_MODULES, vllm_max_lora_rank=max_lora_rank, rebalance_period_s=3600.0,
        operating_points=str(_packaged_points()),
    )
    try:
        store = AdapterStore.from_settings(settings)
        for adapter_id, path in adapters.items():
            store.push(adapter_id, path, owner="loadtest", if_changed=True)
        ranks = {a: int(a.rsplit("-r", 1)[1]) for a in adapters}
        table = rank_class_table(ranks) if max_lora_rank is None else uniform_table(ranks, max_lora_rank)
        RoutingTableStore(redis_lib.Redis.from_url(base.redis_url), prefix).publish(table)
        with serve_app(settings, num_cpus=2, wait_s=600.0) as url:
            with httpx.Client(timeout=300) as client:   # vLLM's first steps and each adapter's first load
                for i, adapter_id in enumerate([None, *adapters][:max(warmup_requests, len(adapters) + 1)]):
                    client.post(f"{url}/v1/completions", json={"model": adapter_id or "small",
                                                               "prompt": f"warm up {i}", "max_tokens": 4})
            yield url
    finally:
        delete_prefix(base.redis_url, prefix)


def _packaged_points() -> Path:
    """Placement's packaged operating points: a served app with a file set skips profiling its replicas at start
    (the benchmark never rebalances, so their values route nothing)."""
    from importlib import resources

    return Path(str(resources.files("lorafleet.placement").joinpath("operating_points.json")))
