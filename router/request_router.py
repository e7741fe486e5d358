"""LoRAFleet's Ray Serve RequestRouter: replicas chosen by a RoutingPolicy over the published RoutingTable."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from lorafleet.infra.replica_api import GenerateRequest, RoutingStats
from lorafleet.placement.routing_table import RoutingTable
from lorafleet.router.routing_policy import POLICIES, ReplicaView

logger = logging.getLogger("lorafleet.router")


class TableCache:
    """The newest published RoutingTable, re-read from Redis every `refresh_s` by a poller thread (started by the
    first get()), so even the first request after a quiet spell routes by a table at most refresh_s old.

    Routing never waits on Redis: while it is down the last good table keeps serving (None before any).
    """

    def __init__(self, redis_url: str | None, prefix: str, refresh_s: float = 1.0) -> None:
        self.redis_url, self.prefix, self.refresh_s = redis_url, prefix, refresh_s
        self._table: RoutingTable | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self._store: Any = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._is_failing = False

    def get(self) -> RoutingTable | None:
        if self.redis_url and self._poller is None:
            # The first request of this router reads the table itself (one GET, ~1 ms; at most the 1 s connect
            # timeout while Redis is down): a router that never routed must not send it by the hash default.
            self._poller = threading.Thread(target=self._poll, daemon=True, name="lorafleet-table-refresh")
            self.refresh_now()
            self._poller.start()
        return self._table

    def close(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.is_set():
            due = self._checked + self.refresh_s - time.monotonic()
            if due > 0:   # refresh_now() ran meanwhile
                self._stop.wait(due)
                continue
            if self._lock.acquire(blocking=False):
                self._checked = time.monotonic()
                self._refresh()
            self._stop.wait(max(self.refresh_s, 0.001))

    def refresh_now(self) -> RoutingTable | None:
        """Re-read the table on this thread (after a rebalance); waits for a refresh already running."""
        if self.redis_url and self._lock.acquire(timeout=5):
            self._checked = time.monotonic()
            self._refresh()
        return self._table

    def _refresh(self) -> None:
        try:
            if self._store is None:
                from lorafleet.infra.redis_conn import connect
                from lorafleet.placement.table_store import RoutingTableStore

                self._store = RoutingTableStore(connect(self.redis_url, timeout_s=1.0), self.prefix)
            current = self._table.version if self._table is not None else -1
            if self._store.version() != current:
                self._table = self._store.load() or self._table
            self._is_failing = False
        except Exception as exc:  # Redis down or a bad table: keep the last good one, try again later
            if not self._is_failing:   # once per outage, not every refresh_s
                logger.warning("routing table not refreshed: %s", exc)
            self._is_failing = True
        finally:
            self._lock.release()


def replica_view(replica: RunningReplica) -> ReplicaView:
    stats = RoutingStats.from_dict(replica.routing_stats)   # {} until the replica's first report
    rank = stats.rank
    if rank is None:   # no stats yet: the rank the replica recorded at start (record_replica_metadata)
        recorded = (getattr(replica, "replica_metadata", None) or {}).get("rank")
        rank = recorded if type(recorded) is int else None
    return ReplicaView(rank=rank, queue_len=stats.queue_len, resident=frozenset(stats.resident_adapters),
                       replica=replica, max_rank=stats.max_rank, adapter_types=stats.adapter_types)


class ViewCache:
    """One ReplicaView per replica, rebuilt only when Serve hands over a new routing-stats dict (about once a
    second per replica), not per request: the frozenset of resident adapters is the costly part. Keyed by the
    replica object's id; the entry holds the object, so the id cannot be reused while cached."""

    def __init__(self) -> None:
        self._views: dict[int, tuple[Any, Any, ReplicaView]] = {}

    def views(self, replicas: list[RunningReplica]) -> list[ReplicaView]:
        cache, out = self._views, []
        for replica in replicas:
            stats = replica.routing_stats
            cached = cache.get(id(replica))
            if cached is None or cached[0] is not stats:
                cached = cache[id(replica)] = (stats, replica, replica_view(replica))
            out.append(cached[2])
        if len(cache) > 2 * len(replicas) + 16:   # replicas that left: drop their views
            live = {id(r) for r in replicas}
            self._views = {k: v for k, v in cache.items() if k in live}
        return out


class LoRAFleetRequestRouter(FIFOMixin, RequestRouter):
    """Configured through `request_router_kwargs`: policy, redis_url, redis_prefix, refresh_s, seed."""

    def initialize_state(self, policy: str = "rank-aware", redis_url: str | None = None,
                         redis_prefix: str = "lorafleet", refresh_s: float = 1.0, seed: int | None = None,
                         **_: Any) -> None:
        self.policy = POLICIES[policy]()
        self.tables = TableCache(redis_url, redis_prefix, refresh_s)
        self.rng = random.Random(seed)
        self.view_cache = ViewCache()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        adapter_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        rank, peft_type = ((request.adapter_rank, request.adapter_type) if isinstance(request, GenerateRequest)
                           else (None, None))
        views = self.view_cache.views(candidate_replicas)
        tiers = self.policy.choose(adapter_id or None, views, self.tables.get(), self.rng, rank, peft_type)
        return [[v.replica for v in tier] for tier in tiers]
