"""Router benchmark: routing decision cost (table lookup + sampling, policy choice) and the HTTP ingress's
latency over the engine's own for 1-token requests (`lorafleet bench router`)."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from lorafleet.benchmarks.timing import bench
from lorafleet.placement.routing_table import RoutingTable
from lorafleet.placement.workload import adapter_ids, zipf_popularity
from lorafleet.router.routing_policy import RankAwarePolicy, ReplicaView

BASE = "bench-base"
ADAPTER = "bench-lora-r8"
LOOKUP_GOAL_US = 10.0
OVERHEAD_P50_GOAL_MS = 2.0


@dataclass(frozen=True, slots=True)
class RouterBenchSpec:
    """Table of num_adapters over num_replicas (each adapter on 1/2/4/8 replicas, 60/25/10/5 %); lookups
    drawn with Zipf popularity; then num_requests 1-token requests per path, paths interleaved."""

    num_adapters: int = 10_000
    num_replicas: int = 64
    zipf_alpha: float = 1.1
    num_lookups: int = 20_000          # calls per timed batch (policy calls: a tenth)
    micro_repeats: int = 15
    num_requests: int = 300
    num_warmup: int = 30
    prompt: str = "Route this request to the replica holding its adapter"
    seed: int = 0


PRESETS: dict[str, RouterBenchSpec] = {
    "full": RouterBenchSpec(),
    "quick": RouterBenchSpec(num_lookups=5_000, micro_repeats=5, num_requests=60, num_warmup=10),
}


def make_table(spec: RouterBenchSpec) -> RoutingTable:
    rng = random.Random(spec.seed)
    entries = {}
    for adapter_id in adapter_ids(spec.num_adapters):
        k = min(rng.choices((1, 2, 4, 8), weights=(60, 25, 10, 5))[0], spec.num_replicas)
        weights = [rng.random() + 0.1 for _ in range(k)]
        total = sum(weights)
        entries[adapter_id] = tuple((r, w / total) for r, w in zip(rng.sample(range(spec.num_replicas), k), weights,
                                                                   strict=True))
    return RoutingTable(spec.num_replicas, entries, version=1)


def routing_micro(spec: RouterBenchSpec) -> list[dict]:
    """µs per call of each routing step (min over interleaved repeats: other processes only add time)."""
    from lorafleet.router.request_router import ViewCache, replica_view

    table = make_table(spec)
    rng, np_rng = random.Random(spec.seed), np.random.default_rng(spec.seed)
    ids = adapter_ids(spec.num_adapters)
    popular = np_rng.choice(spec.num_adapters, size=spec.num_lookups, p=zipf_popularity(spec.num_adapters,
                                                                                         spec.zipf_alpha))
    lookups = [ids[i] for i in popular]
    unknown = [f"unplaced-{i}" for i in range(spec.num_lookups)]
    for adapter_id in ids:   # steady state: every adapter's cumulative probabilities already built
        table.sample(adapter_id, rng)
    num_policy = max(1, spec.num_lookups // 10)
    resident = [frozenset(rng.sample(ids[:200], 16)) for _ in range(spec.num_replicas)]
    views = [ReplicaView(r, rng.randrange(8), resident[r]) for r in range(spec.num_replicas)]
    stats = [SimpleNamespace(routing_stats={"rank": v.rank, "queue_len": v.queue_len,
                                            "resident_adapters": sorted(v.resident)}) for v in views]
    policy = RankAwarePolicy()

    def sample_all(names: list[str]) -> Callable[[], None]:
        def run() -> None:
            for adapter_id in names:
                table.sample(adapter_id, rng)
        return run

    def choose() -> None:
        for adapter_id in lookups[:num_policy]:
            policy.choose(adapter_id, views, table, rng)

    view_cache = ViewCache()

    def request_router_path() -> None:   # what choose_replicas does per request: cached views, then choose
        for adapter_id in lookups[:num_policy]:
            policy.choose(adapter_id, view_cache.views(stats), table, rng)  # type: ignore[arg-type]

    def request_router_fresh_stats() -> None:   # worst case: every replica's stats new since the last request
        for adapter_id in lookups[:num_policy]:
            policy.choose(adapter_id, [replica_view(s) for s in stats], table, rng)  # type: ignore[arg-type]

    fns = {"sample": sample_all(lookups), "sample_unknown": sample_all(unknown), "choose": choose,
           "request_router": request_router_path, "request_router_fresh": request_router_fresh_stats}
    seconds = bench(fns, device=torch.device("cpu"), repeats=spec.micro_repeats, warmup=1)
    calls = {"sample": len(lookups), "sample_unknown": len(unknown), "choose": num_policy,
             "request_router": num_policy, "request_router_fresh": num_policy}
    names = {
        "sample": f"table.sample: lookup + sampling ({spec.num_adapters:,} adapters)",
        "sample_unknown": "table.sample: not in table (consistent hash)",
        "choose": f"RankAwarePolicy.choose ({spec.num_replicas} replicas)",
        "request_router": f"choose_replicas: {spec.num_replicas} cached replica views + choose",
        "request_router_fresh": f"choose_replicas, all {spec.num_replicas} replicas' stats new: views rebuilt",
    }
    return [{"key": key, "name": names[key], "us_per_call": 1e6 * seconds[key] / calls[key], "calls": calls[key]}
            for key in fns]


def percentile_ms(values: list[float], q: float) -> float:
    return 1e3 * float(np.percentile(np.asarray(values), q))


async def _measure(app: Any, replica: Any, spec: RouterBenchSpec) -> dict[str, list[float]]:
    """Seconds per request of each path, all on one event loop (the engine's stream driver is per loop)."""
    import httpx
    import uvicorn

    from lorafleet.infra.replica_api import GenerateRequest, StreamError
    from lorafleet.router.schemas import new_id

    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections; without it Nagle
    # holds each response's body behind its headers until the client's delayed ACK (+40 ms a request).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    body = {"model": ADAPTER, "prompt": spec.prompt, "max_tokens": 1, "temperature": 0.0}

    def request() -> GenerateRequest:  # what RouterCore sends the replica for `body` (the engine path skips the router)
        return GenerateRequest(request_id=new_id("req"), adapter_id=ADAPTER, prompt=spec.prompt, max_tokens=1,
                               temperature=0.0)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as asgi:
        async def engine_once() -> float:
            began = time.perf_counter()
            items = [item async for item in replica.generate(request())]
            assert items and not isinstance(items[-1], StreamError), items
            return time.perf_counter() - began

        async def asgi_once() -> float:
            began = time.perf_counter()
            response = await asgi.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return time.perf_counter() - began

        def client_thread() -> dict[str, list[float]]:  # a real HTTP client on its own thread, like a user's
            samples: dict[str, list[float]] = {"engine": [], "asgi": [], "http": []}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
                def http_once() -> float:
                    began = time.perf_counter()
                    response = client.post("/v1/completions", json=body)
                    assert response.status_code == 200, response.text
                    return time.perf_counter() - began

                paths: list[tuple[str, Callable[[], float]]] = [
                    ("engine", lambda: asyncio.run_coroutine_threadsafe(engine_once(), loop).result()),
                    ("asgi", lambda: asyncio.run_coroutine_threadsafe(asgi_once(), loop).result()),
                    ("http", http_once)]
                for i in range(spec.num_warmup + spec.num_requests):
                    for name, once in paths[i % 3:] + paths[:i % 3]:   # rotate: drift hits every path alike
                        seconds = once()
                        if i >= spec.num_warmup:
                            samples[name].append(seconds)
            return samples

        try:
            return await asyncio.to_thread(client_thread)
        finally:
            server.should_exit = True
            await serving


def http_overhead(spec: RouterBenchSpec, model_dir: Path, adapter_dir: Path) -> list[dict]:
    from lorafleet.replicas.deployment import ReplicaServer
    from lorafleet.replicas.engine import Engine
    from lorafleet.router.app import create_app
    from lorafleet.router.core import InProcessBackend, RouterConfig, RouterCore

    replica = ReplicaServer(Engine.from_pretrained(model_dir, max_num_seqs=8, kv_cache_bytes=16 << 20,
                                                   kernel_backend="torch", max_model_len=256))
    replica.engine.load_adapter(ADAPTER, adapter_dir)
    core = RouterCore(InProcessBackend(replica), RouterConfig(base_model_name=BASE))
    try:
        samples = asyncio.run(_measure(create_app(lambda: core), replica, spec))
    finally:
        replica.engine.close()
    engine = samples["engine"]
    rows = []
    for key, name in (("engine", "engine only (ReplicaServer.generate)"),
                      ("asgi", "router, in-process ASGI"),
                      ("http", "router, HTTP (uvicorn, 127.0.0.1)")):
        row = {"key": key, "name": name, "num_requests": len(samples[key]),
               "p50_ms": percentile_ms(samples[key], 50), "p99_ms": percentile_ms(samples[key], 99)}
        if key != "engine":
            row |= {"overhead_p50_ms": row["p50_ms"] - percentile_ms(engine, 50),
                    "overhead_p99_ms": row["p99_ms"] - percentile_ms(engine, 99)}
        rows.append(row)
    return rows


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    micro = Table(title=f"Routing decision (goal: lookup + sampling <= {LOOKUP_GOAL_US:g} µs)")
    for column in ("step", "µs / call", "calls"):
        micro.add_column(column, justify="left" if column == "step" else "right")
    for row in result["routing"]:
        micro.add_row(row["name"], f"{row['us_per_call']:.2f}", f"{row['calls']:,}")
    http = Table(title=f"1-token requests; +P = minus the engine's (goal: +P50 <= {OVERHEAD_P50_GOAL_MS:g} ms)")
    for column in ("path", "P50 ms", "P99 ms", "+P50 ms", "+P99 ms"):
        http.add_column(column, justify="left" if column == "path" else "right")
    for row in result["http"]:
        over = [f"{row[k]:.2f}" if k in row else "-" for k in ("overhead_p50_ms", "overhead_p99_ms")]
        http.add_row(row["name"], f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}", *over)
    console = Console()
    console.print(micro)
    console.print(http)
    console.print(f"goals: {result['goals']}")


def _assets(work_dir: Path, model_dir: Path | None) -> tuple[Path, Path]:
    from lorafleet.infra.adapter_maker import make_adapter
    from lorafleet.replicas.checkpoint import make_model

    if model_dir is None:
        model_dir = work_dir / "model-tiny"
        if not (model_dir / "config.json").is_file():
            make_model(model_dir, "tiny", seed=0)
    adapter_dir = work_dir / f"{ADAPTER}-{model_dir.name}"
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        make_adapter(adapter_dir, model_dir, "lora", 8, ["q_proj", "v_proj"], seed=8)
    return model_dir, adapter_dir


def run_router_bench(model_dir: str | Path | None = None, *, quick: bool = False, spec: RouterBenchSpec | None = None,
                     work_dir: str | Path = ".lorafleet/bench-router") -> dict:
    """Both measurements as plain data (the caller writes it with benchmarks.results.write_result and prints
    it with print_report). Runs on torch's current threads: `lorafleet bench router` sets 1 (the tiny model
    gains nothing from more; fewer spinning threads give steadier times)."""
    spec = spec or PRESETS["quick" if quick else "full"]
    model, adapter = _assets(Path(work_dir), Path(model_dir) if model_dir else None)
    routing = routing_micro(spec)
    http = http_overhead(spec, model, adapter)
    sample_us = next(r["us_per_call"] for r in routing if r["key"] == "sample")
    over = next(r for r in http if r["key"] == "http")
    goals = {"lookup_sample_us": round(sample_us, 3), "lookup_sample_met": sample_us <= LOOKUP_GOAL_US,
             "http_overhead_p50_ms": round(over["overhead_p50_ms"], 3),
             "http_overhead_p50_met": over["overhead_p50_ms"] <= OVERHEAD_P50_GOAL_MS,
             "http_overhead_p99_ms": round(over["overhead_p99_ms"], 3)}
    return {"model": str(model), "spec": asdict(spec), "routing": routing, "http": http, "goals": goals}
