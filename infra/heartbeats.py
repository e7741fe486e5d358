"""Replica heartbeats in Redis: each replica beats, placement reads which ranks are alive.

Each replica writes `{prefix}:replicas:live:{rank}` every HEARTBEAT_S with a TTL of HEARTBEAT_TTL_S and adds its
rank to `{prefix}:replicas:seen`. A rank is dead only once it has beaten and then stopped: a rank that never beat
(still loading its model, an older version) counts as live, and with every rank silent (Redis restarted, cluster
down) nothing is known dead. Placement over the live ranks is `lorafleet.placement.liveness`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from lorafleet.infra.errors import StoreUnavailable
from lorafleet.infra.redis_conn import REDIS_DOWN_ERRORS

logger = logging.getLogger(__name__)
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


    def beating_ranks(self) -> list[int]:
        """Ranks with a heartbeat now (ascending): with autoscaling, how many replicas there are."""
        try:
            keys = list(self.redis.scan_iter(f"{self.base}*", count=1000))
        except REDIS_DOWN_ERRORS as exc:
            raise StoreUnavailable(f"replica heartbeats: Redis unreachable ({exc.__class__.__name__}: {exc})") from None
        ranks = []
        for key in keys:
            tail = (key.decode() if isinstance(key, bytes) else key)[len(self.base):]
            if tail.isdigit():
                ranks.append(int(tail))
        return sorted(ranks)


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
