"""The routing table in Redis: `{prefix}:routing_table` (JSON), `{prefix}:routing_table:version`, and
pub/sub `{prefix}:events:routing_table` ({"version": v}) so routers reload; plus adapter ranks for the solver.

Publishing is compare-and-set (WATCH/MULTI): versions only grow, and two controllers never interleave.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from lorafleet.infra.assignments import assigned_key, per_rank
from lorafleet.infra.errors import PlacementConflict, StoreUnavailable
from lorafleet.infra.redis_conn import REDIS_DOWN_ERRORS
from lorafleet.placement.routing_table import RoutingTable

MAX_CAS_RETRIES = 64


class RoutingTableStore:
    """Read and publish the routing table in Redis (redis-py client, bytes or str responses)."""

    def __init__(self, redis_client: Any, prefix: str) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.table_key = f"{prefix}:routing_table"
        self.version_key = f"{prefix}:routing_table:version"
        self.channel = f"{prefix}:events:routing_table"
        self.adapters_key = f"{prefix}:placement:adapters"
        self.assigned_key = assigned_key(prefix)

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"routing table store: Redis unreachable ({exc.__class__.__name__}: {exc})")

    def version(self) -> int:
        """Version of the published table; 0 when none was published."""
        try:
            raw = self.redis.get(self.version_key)
        except REDIS_DOWN_ERRORS as exc:
            raise self._unavailable(exc) from None
        return int(raw) if raw is not None else 0

    def load(self) -> RoutingTable | None:
        """The published table, or None when none was published."""
        try:
            raw = self.redis.get(self.table_key)
        except REDIS_DOWN_ERRORS as exc:
            raise self._unavailable(exc) from None
        return RoutingTable.from_json(raw) if raw is not None else None

    def publish(self, table: RoutingTable, expected_version: int | None = None, *,
                homes: dict[str, int] | None = None, sizes: dict[str, int] | None = None) -> RoutingTable:
        """Store `table` as version current+1 and announce it; returns the table with that version.

        With `expected_version`, fail with PlacementConflict if the stored version differs (someone
        published since the caller read the table it solved from). Each replica's list of adapters to hold goes
        beside it (infra/assignments.py): the table's, then `homes` (adapter -> rank) outside it, with `sizes`.
        """
        import redis

        try:
            with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(MAX_CAS_RETRIES):
                    try:
                        pipe.watch(self.version_key)
                        raw = pipe.get(self.version_key)
                        current = int(raw) if raw is not None else 0
                        if expected_version is not None and current != expected_version:
                            raise PlacementConflict(
                                f"routing table is at version {current}, expected {expected_version}: "
                                "another controller published; re-read and solve again"
                            )
                        stamped = table.with_version(current + 1)
                        pipe.multi()
                        pipe.set(self.table_key, stamped.to_json())
                        pipe.set(self.version_key, stamped.version)
                        # Each replica's own list, so replicas prefetch without parsing the table (infra layer).
                        assigned = per_rank(stamped.entries, stamped.num_replicas, homes, sizes)
                        pipe.delete(self.assigned_key)
                        pipe.hset(self.assigned_key, mapping={**assigned, "version": str(stamped.version)})
                        pipe.publish(self.channel, json.dumps({"version": stamped.version}))
                        pipe.execute()
                        return stamped
                    except redis.exceptions.WatchError:
                        time.sleep(random.uniform(0, 0.002))  # jitter: racing controllers stop colliding
                        continue
        except REDIS_DOWN_ERRORS as exc:
            raise self._unavailable(exc) from None
        raise PlacementConflict(f"routing table: {MAX_CAS_RETRIES} concurrent publishes in a row; try again")

    def subscribe(self) -> Any:
        """A redis-py PubSub subscribed to table announcements (`get_message()` yields {"version": v})."""
        try:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.channel)
        except REDIS_DOWN_ERRORS as exc:
            raise self._unavailable(exc) from None
        return pubsub

    # Adapter facts the solver needs (rank, bytes). The store's push records them; see placement/README.md.
    def put_adapter_info(self, adapter_id: str, rank: int, size_bytes: int) -> None:
        try:
            record = json.dumps({"rank": int(rank), "size_bytes": int(size_bytes)})
            self.redis.hset(self.adapters_key, adapter_id, record)
        except REDIS_DOWN_ERRORS as exc:
            raise self._unavailable(exc) from None

    def adapter_info(self) -> dict[str, tuple[int, int]]:
        """adapter_id → (rank, size_bytes) for every adapter recorded with put_adapter_info()."""
        try:
            raw = self.redis.hgetall(self.adapters_key)
        except REDIS_DOWN_ERRORS as exc:
            raise self._unavailable(exc) from None
        out: dict[str, tuple[int, int]] = {}
        for key, value in raw.items():
            adapter_id = key.decode() if isinstance(key, bytes) else key
            try:
                info = json.loads(value)
                out[adapter_id] = (int(info["rank"]), int(info.get("size_bytes", 0)))
            except (ValueError, KeyError, TypeError):
                continue  # a malformed record is skipped; its adapter falls back to the default rank
        return out
