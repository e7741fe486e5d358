"""Fetch metrics of a replica's adapter source: hits per tier, bytes per tier, fetch latency, faults."""

from __future__ import annotations

import threading
from collections import deque

TIERS = ("redis", "object_store")
LATENCY_WINDOW = 1024  # most recent fetches per tier kept for percentiles


class StoreMetrics:
    """Thread-safe counters; `snapshot()` gives plain data for /metrics, logs and benchmarks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = dict.fromkeys(TIERS, 0)
        self.bytes = dict.fromkeys(TIERS, 0)
        self.seconds = dict.fromkeys(TIERS, 0.0)
        self._latency: dict[str, deque[float]] = {t: deque(maxlen=LATENCY_WINDOW) for t in TIERS}
        self.num_coalesced = 0  # fetches that waited on another thread's fetch of the same adapter
        self.num_hash_mismatches = 0
        self.num_registry_down = 0  # fetches answered from what the replica had while Redis was unreachable
        self.num_errors = 0

    def record_fetch(self, tier: str, seconds: float) -> None:
        with self._lock:
            self.hits[tier] += 1
            self.seconds[tier] += seconds
            self._latency[tier].append(seconds)

    def add_bytes(self, tier: str, num_bytes: int) -> None:
        with self._lock:
            self.bytes[tier] += num_bytes

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict:
        with self._lock:
            latency = {}
            for tier, window in self._latency.items():
                ordered = sorted(window)
                latency[tier] = {"p50_ms": _percentile_ms(ordered, 0.5), "p99_ms": _percentile_ms(ordered, 0.99)}
            return {
                "hits": dict(self.hits), "bytes": dict(self.bytes), "seconds": dict(self.seconds),
                "latency": latency, "num_coalesced": self.num_coalesced,
                "num_hash_mismatches": self.num_hash_mismatches, "num_registry_down": self.num_registry_down,
                "num_errors": self.num_errors,
            }


def _percentile_ms(ordered: list[float], q: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3 if ordered else None
