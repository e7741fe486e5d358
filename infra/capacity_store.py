"""The operating points the served replicas measured, kept in Redis for the placement controller.

`{prefix}:placement:operating_points` holds one JSON document: {"key": cache key (model, device, engine settings),
"file": where the profiling replica cached it, "points": the operating-points JSON of
lorafleet.placement.operating_points}. A replica writes it after profiling on first start; the controller and
`lorafleet rebalance` read it. Plain JSON here: replicas write it without importing placement.
"""

from __future__ import annotations

import json
from typing import Any

from lorafleet.infra.errors import StoreUnavailable
from lorafleet.infra.redis_conn import REDIS_DOWN_ERRORS


class CapacityStore:
    def __init__(self, client: Any, prefix: str) -> None:
        self.redis, self.key = client, f"{prefix}:placement:operating_points"

    def put(self, key: str, file: str, points: dict) -> None:
        try:
            self.redis.set(self.key, json.dumps({"key": key, "file": file, "points": points}))
        except REDIS_DOWN_ERRORS as exc:
            raise StoreUnavailable(f"operating points not stored: Redis unreachable ({exc})") from None

    def get(self) -> dict | None:
        """{"key", "file", "points"} or None when no replica has profiled yet (or the value is not readable)."""
        try:
            raw = self.redis.get(self.key)
        except REDIS_DOWN_ERRORS as exc:
            raise StoreUnavailable(f"operating points not read: Redis unreachable ({exc})") from None
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("points"), dict) else None


def capacity_by_rank(points: dict) -> tuple[dict[int, float], int]:
    """(max tokens/s per rank class, adapter memory bytes) of an operating-points document; ({}, 0) if malformed.
    Plain JSON reading for the replicas (the solver's parser is lorafleet.placement.operating_points)."""
    try:
        by_rank = {int(p["rank"]): float(p["max_tokens_per_s"]) for p in points["points"]}
        memory = int(points.get("memory", {}).get("max_adapter_bytes", 0))
    except (KeyError, TypeError, ValueError):
        return {}, 0
    return {r: v for r, v in by_rank.items() if r > 0 and v > 0}, max(memory, 0)
