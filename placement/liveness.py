"""Which replica ranks are alive, from heartbeats in Redis, and placement over only those.

Each replica writes `{prefix}:replicas:live:{rank}` every HEARTBEAT_S with a TTL of HEARTBEAT_TTL_S and adds its
rank to `{prefix}:replicas:seen`. The rebalancer leaves out ranks that beat once and stopped, so a replica that died
and was not replaced (no resources for a new one) loses its adapters at the next rebalance instead of keeping them
in the table. A rank that never beat (still loading its model, an older version) counts as live, and with every
rank silent (Redis restarted, cluster down) placement uses every rank, as before.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from lorafleet.infra.errors import StoreUnavailable
from lorafleet.infra.redis_conn import REDIS_DOWN_ERRORS
from lorafleet.placement.routing_table import RoutingTable
from lorafleet.placement.solver import Placement

logger = logging.getLogger("lorafleet.placement")
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 10.0


class ReplicaLiveness:
    """Heartbeat keys of the replicas under one Redis prefix (any redis-py client), and the set of ranks that
    ever beat: a rank is dead only once it has beaten and then stopped, so replicas still loading their model
    at start-up are not mistaken for dead ones."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.redis, self.base, self.seen_key = client, f"{prefix}:replicas:live:", f"{prefix}:replicas:seen"

    def beat(self, rank: int, info: dict | None = None, ttl_s: float = HEARTBEAT_TTL_S) -> None:
        body = json.dumps({"time": time.time(), **(info or {})})
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(f"{self.base}{rank}", body, px=int(ttl_s * 1000))
            pipe.sadd(self.seen_key, rank)
            pipe.execute()

    def live_ranks(self, num_replicas: int) -> list[int] | None:
        """Ranks 0..num_replicas-1 not known dead (beat once, no heartbeat now), ascending; None when no rank is
        known dead (nothing to leave out) or none beats at all (unknown: Redis restarted, no replica up yet)."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.mget([f"{self.base}{rank}" for rank in range(num_replicas)])
                pipe.smembers(self.seen_key)
                values, seen = pipe.execute()
        except REDIS_DOWN_ERRORS as exc:
            raise StoreUnavailable(f"replica heartbeats: Redis unreachable ({exc.__class__.__name__}: {exc})") from None
        seen_ranks = {int(r) for r in seen}
        dead = {rank for rank, value in enumerate(values) if value is None and rank in seen_ranks}
        if not dead or len(dead) == num_replicas:
            return None
        return [rank for rank in range(num_replicas) if rank not in dead]


def start_heartbeat(liveness: ReplicaLiveness, get_rank: Callable[[], int | None],
                    get_info: Callable[[], dict], period_s: float = HEARTBEAT_S) -> threading.Event:
    """Beat every `period_s` on a daemon thread until the returned event is set; a Redis error skips one beat."""
    stop = threading.Event()

    def loop() -> None:
        failing = False
        while not stop.is_set():
            rank = get_rank()
            if rank is not None:
                try:
                    liveness.beat(rank, get_info())
                    failing = False
                except Exception as exc:  # Redis down: placement treats us as dead after the TTL, serving goes on
                    if not failing:
                        logger.warning("replica heartbeat not written: %s", exc)
                    failing = True
            stop.wait(period_s)

    threading.Thread(target=loop, daemon=True, name="lorafleet-heartbeat").start()
    return stop


def compact_previous(previous: RoutingTable | None, live: list[int]) -> RoutingTable | None:
    """The previous table over the live ranks only, renumbered 0..len(live)-1 (shares on dead ranks dropped,
    the rest renormalised), for the solver's churn minimisation."""
    if previous is None:
        return None
    index = {rank: i for i, rank in enumerate(live)}
    entries = {}
    for adapter_id, entry in previous.entries.items():
        kept = [(index[rank], p) for rank, p in entry if rank in index and p > 0]
        total = sum(p for _, p in kept)
        if kept and total > 0:
            entries[adapter_id] = tuple((i, p / total) for i, p in kept)
    return RoutingTable(len(live), entries, version=previous.version, created_at=previous.created_at)


def expand_placement(placement: Placement, live: list[int], num_replicas: int) -> Placement:
    """A placement solved over len(live) compact replicas, put back on the physical ranks `live` of
    `num_replicas`: dead ranks get no adapter and zero load."""
    def spread(values: Any, empty: Any) -> tuple:
        out = [empty] * num_replicas
        for i, rank in enumerate(live):
            out[rank] = values[i]
        return tuple(out)

    table = placement.table
    entries = {a: tuple((live[i], p) for i, p in entry) for a, entry in table.entries.items()}
    meta = {**dict(table.meta), "live_ranks": list(live)}
    for key in ("replica_max_rank", "replica_tokens_per_s"):   # the solver's per-replica predictions
        if key in meta:
            meta[key] = list(spread(meta[key], 0))
    physical = RoutingTable(num_replicas, entries, version=table.version, created_at=table.created_at, meta=meta)
    return replace(placement, table=physical, replica_max_rank=spread(placement.replica_max_rank, 0),
                   replica_tokens_per_s=spread(placement.replica_tokens_per_s, 0.0),
                   replica_utilization=spread(placement.replica_utilization, 0.0),
                   replica_adapter_bytes=spread(placement.replica_adapter_bytes, 0),
                   replica_num_adapters=spread(placement.replica_num_adapters, 0),
                   permutation=tuple(live[i] for i in placement.permutation))
