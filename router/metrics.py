"""Prometheus metrics of the router (prometheus-client, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def observe_replica(self, info: dict) -> None:
        """Residency and queue facts a replica attaches to its first streamed item."""
        replica = str(info.get("replica_rank"))
        for tier in ("device", "host"):
            if f"num_{tier}" in info:
                self.residency.labels(replica, tier).set(info[f"num_{tier}"])
        if "queue_len" in info:
            self.queue.labels(replica).set(info["queue_len"])
