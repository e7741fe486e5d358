"""Prometheus metrics of the router (prometheus-client, served at /metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lorafleet.infra.replica_api import ServedBy

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class RouterMetrics:
    """One registry per router process; label `adapter_state` is where the adapter was when the request
    arrived at its replica: base, device, host (fetched, not resident) or cold (fetched from the store)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorafleet_requests", "Requests by endpoint and HTTP status.",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("lorafleet_ttft_seconds", "Time to first token at the router, by adapter state.",
                              ["adapter_state"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lorafleet_tpot_seconds", "Time per output token after the first.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("lorafleet_request_seconds", "End-to-end request latency at the router.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("lorafleet_adapter_tokens", "Tokens by adapter and kind (prompt/completion).",
                              ["adapter", "kind"], registry=r)
        self.inflight = Gauge("lorafleet_inflight_requests", "Requests being served by this router.", registry=r)
        self.cache_hits = Counter("lorafleet_adapter_cache_requests",
                                  "Adapter requests by the tier that held the adapter at the replica.",
                                  ["replica", "adapter_state"], registry=r)
        self.residency = Gauge("lorafleet_replica_adapters", "Adapters per replica by tier (device/host).",
                               ["replica", "tier"], registry=r)
        self.queue = Gauge("lorafleet_replica_queue", "Waiting + running sequences per replica (last seen).",
                           ["replica"], registry=r)

    def observe_first(self, served_by: ServedBy, ttft_s: float) -> None:
        """TTFT at the router, and the residency and queue facts a replica attaches to a stream's first chunk."""
        replica = str(served_by.replica_rank)
        self.ttft.labels(served_by.adapter_state).observe(ttft_s)
        self.cache_hits.labels(replica, served_by.adapter_state).inc()
        self.residency.labels(replica, "device").set(served_by.num_device_adapters)
        self.residency.labels(replica, "host").set(served_by.num_host_adapters)
        self.queue.labels(replica).set(served_by.queue_len)


# Endpoint label of a /v1/ path: its first two segments (the adapter id in /v1/adapters/{id} is not a label).
_ENDPOINTS = {"completions": "completions", "chat": "chat", "models": "models", "adapters": "adapters",
              "placement": "placement"}


def endpoint_label(path: str) -> str:
    """'completions', 'chat', 'models', 'adapters', 'placement' or 'other' (bounded label values)."""
    parts = path.split("/")
    return _ENDPOINTS.get(parts[2], "other") if len(parts) > 2 else "other"


class RequestCounter:
    """ASGI, outermost: counts every /v1/ response by endpoint and status in `lorafleet_requests_total`, so the
    401s of the auth middleware, the 413s of the size gate and the 400s of validation count as well as the
    generations. A response that never started counts as 499 when the client went away first (nginx's
    code), else 500."""

    def __init__(self, app: Any, get_metrics: Callable[[], RouterMetrics]) -> None:
        self.app, self.get_metrics = app, get_metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status: int | None = None
        cancelled = False

        async def counted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except asyncio.CancelledError:   # the client went away before an answer started
            cancelled = True
            raise
        finally:
            label = str(status) if status is not None else "499" if cancelled else "500"
            self.get_metrics().requests.labels(endpoint_label(scope["path"]), label).inc()
