"""A hung Redis (connections accepted, never answered) degrades serving by at most one timeout, never stalls it:
the router skips the registry for a while after a failed lookup, and the replica flushes demand off its loop."""

from __future__ import annotations

import asyncio
import time

import httpx
import redis
from lf_testing import Blackhole

from lorafleet.infra.demand import DemandCounters
from lorafleet.infra.object_store import LocalDirObjectStore
from lorafleet.infra.store import AdapterStore
from lorafleet.replicas.deployment import DemandBuffer
from lorafleet.router import core as router_core
from lorafleet.router.app import create_app
from lorafleet.router.core import RouterConfig
from lorafleet.router.schemas import CompletionRequest

BASE = "tiny"
TIMEOUT_S = 0.5


def hung_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)


def test_router_pays_the_timeout_once_per_window_and_serves_cached_adapters(make_core, hardening_replica, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(router_core, "REGISTRY_RETRY_S", 30.0)   # one window for the whole test
    with Blackhole() as url:
        store = AdapterStore(LocalDirObjectStore(tmp_path / "store"), hung_client(url), "lftest-hung")
        core = make_core(RouterConfig(BASE), store=store)
        app = create_app(lambda: core)

        async def run() -> list[tuple[float, httpx.Response]]:
            transport = httpx.ASGITransport(app=app)
            out = []
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                for i in range(8):
                    body = {"model": ("alpha-lora", "gamma-ia3")[i % 2], "prompt": "Hello", "max_tokens": 4,
                            "temperature": 0}
                    start = time.monotonic()
                    response = await client.post("/v1/completions", json=body)
                    out.append((time.monotonic() - start, response))
            return out

        results = asyncio.run(run())
    for _, response in results:   # the replica holds both adapters: every request is answered
        assert response.status_code == 200, response.text
    slow = [seconds for seconds, _ in results if seconds >= TIMEOUT_S]
    assert len(slow) == 1 and results[0][0] >= TIMEOUT_S, [round(s, 3) for s, _ in results]   # only the first
    assert max(seconds for seconds, _ in results[1:]) < TIMEOUT_S


def test_requests_arriving_while_a_lookup_hangs_do_not_wait_for_it(make_core, hardening_replica, tmp_path):
    """One registry lookup hangs; requests arriving 0.3 s later (past SLOW_LOOKUP_S) route without the registry
    instead of queueing behind the same timeout."""
    with Blackhole() as url:
        store = AdapterStore(LocalDirObjectStore(tmp_path / "store"), hung_client(url), "lftest-hung")
        core = make_core(RouterConfig(BASE), store=store)
        app = create_app(lambda: core)
        body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}

        async def timed(client: httpx.AsyncClient, model: str) -> tuple[float, int]:
            start = time.monotonic()
            response = await client.post("/v1/completions", json=body | {"model": model})
            return time.monotonic() - start, response.status_code

        async def run() -> tuple[tuple[float, int], list[tuple[float, int]]]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                first = asyncio.create_task(timed(client, "alpha-lora"))
                await asyncio.sleep(router_core.SLOW_LOOKUP_S + 0.05)
                later = await asyncio.gather(*(timed(client, ("beta-lora", "gamma-ia3")[i % 2]) for i in range(6)))
                return await first, list(later)

        first, later = asyncio.run(run())
    assert first[1] == 200 and first[0] >= TIMEOUT_S, first   # it paid the timeout, then was served
    assert all(status == 200 for _, status in later), later
    assert max(seconds for seconds, _ in later) < TIMEOUT_S, later   # none waited for the hung Redis


def test_a_confirmed_adapter_is_not_looked_up_again_for_a_second(make_core, hardening_store, monkeypatch):
    core = make_core(RouterConfig(BASE), store=hardening_store)
    calls = []
    real_current = hardening_store.current
    monkeypatch.setattr(hardening_store, "current", lambda adapter_id: calls.append(adapter_id) or
                        real_current(adapter_id))
    for _ in range(5):
        assert core.resolve_model("alpha-lora") == "alpha-lora"
    assert calls == ["alpha-lora"]
    core._known["alpha-lora"] = (time.monotonic() - 0.01, *core._known["alpha-lora"][1:])   # expired: asked again
    core.resolve_model("alpha-lora")
    assert calls == ["alpha-lora", "alpha-lora"]


def test_the_request_to_the_replica_carries_the_registry_rank_and_type(make_core, hardening_store):
    """What the request router needs to keep an adapter off replicas that cannot run it (a vLLM replica of a lower
    rank class, or any vLLM replica for IA3)."""
    core = make_core(RouterConfig(BASE), store=hardening_store)
    for model, rank, peft_type in (("alpha-lora", 4, "LORA"), ("gamma-ia3", 1, "IA3"), (BASE, None, None)):
        adapter_id = core.resolve_model(model)
        request = core._replica_request(CompletionRequest(model=model, prompt="hi", max_tokens=2), adapter_id)
        assert (request.adapter_id, request.adapter_rank, request.adapter_type) == (adapter_id, rank, peft_type)
    no_registry = make_core(RouterConfig(BASE))   # nothing known: the router routes without the facts
    request = no_registry._replica_request(CompletionRequest(model="alpha-lora", prompt="hi", max_tokens=2),
                                           no_registry.resolve_model("alpha-lora"))
    assert (request.adapter_rank, request.adapter_type) == (None, None)


def test_demand_flush_never_blocks_the_caller_on_a_hung_redis():
    with Blackhole() as url:
        buffer = DemandBuffer(DemandCounters(hung_client(url), "lftest-hung"))
        buffer.add("a", 10)
        start = time.monotonic()
        buffer.flush_if_due(now=time.monotonic() + 2.0)   # due: starts the flush on a worker thread
        assert time.monotonic() - start < 0.1   # the caller (the replica's event loop) did not wait
        buffer.add("a", 5)
        buffer.flush_if_due(now=time.monotonic() + 4.0)   # the first flush still hangs: none started
        assert buffer._pending == {"a": [5, 1]}
        deadline = time.monotonic() + 10
        while buffer._flushing.is_set():   # the hung call times out; the counts of that period are dropped
            assert time.monotonic() < deadline
            time.sleep(0.05)
        buffer.flush_if_due(now=time.monotonic() + 6.0, wait=True)
        assert buffer._pending == {}


def test_demand_flush_records_on_a_healthy_redis(redis_prefix):
    client, prefix = redis_prefix
    counters = DemandCounters(client, prefix)
    buffer = DemandBuffer(counters)
    for _ in range(3):
        buffer.add("a", 7)
    buffer.add(None, 100)   # the base model is not counted
    buffer.flush_if_due(now=time.monotonic() + 2.0, wait=True)
    assert counters.window(60) == {"a": (21, 3)}


def test_a_lorafleet_replica_reports_it_runs_every_type_up_to_its_max_rank(hardening_replica):
    stats = hardening_replica.routing_stats()
    assert stats.max_rank == hardening_replica.engine.config.max_rank and stats.adapter_types == ()
