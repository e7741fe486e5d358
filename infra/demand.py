"""Per-adapter demand counters in Redis: tokens and requests per time bucket, read back over a window.

Keys: `{prefix}:demand:tokens:{bucket}` and `{prefix}:demand:requests:{bucket}`, hashes adapter_id → count,
bucket = floor(unix time / bucket_s); each expires `retention_s + bucket_s` after its last write.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from lorafleet.infra.adapter_ids import validate_adapter_id
from lorafleet.infra.errors import LoRAFleetError, StoreUnavailable
from lorafleet.infra.redis_conn import REDIS_DOWN_ERRORS

logger = logging.getLogger("lorafleet.demand")


class DemandCounters:
    """Tokens and requests per adapter per time bucket in Redis. Replicas and the store call record()."""

    def __init__(self, redis_client: Any, prefix: str, bucket_s: int = 10, retention_s: int = 3600) -> None:
        if bucket_s < 1 or retention_s < bucket_s:
            raise ValueError(f"need bucket_s >= 1 and retention_s >= bucket_s, got {bucket_s}, {retention_s}")
        self.redis = redis_client
        self.prefix = prefix
        self.bucket_s = int(bucket_s)
        self.retention_s = int(retention_s)

    def _key(self, kind: str, bucket: int) -> str:
        return f"{self.prefix}:demand:{kind}:{bucket}"

    def record(self, adapter_id: str, num_tokens: int, num_requests: int = 1, now: float | None = None) -> None:
        """Add `num_tokens` (prompt + generated) and `num_requests` to the bucket holding `now`."""
        validate_adapter_id(adapter_id)
        if int(num_tokens) < 0 or int(num_requests) < 0:
            raise ValueError(f"counts must be >= 0, got tokens={num_tokens}, requests={num_requests}")
        bucket = int((time.time() if now is None else now) // self.bucket_s)
        ttl = self.retention_s + self.bucket_s  # relative to the wall clock, so a replayed `now` still lives
        tokens_key, requests_key = self._key("tokens", bucket), self._key("requests", bucket)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(tokens_key, adapter_id, int(num_tokens))
            pipe.hincrby(requests_key, adapter_id, int(num_requests))
            pipe.expire(tokens_key, ttl)
            pipe.expire(requests_key, ttl)
            pipe.execute()
        except REDIS_DOWN_ERRORS as exc:
            raise StoreUnavailable(f"demand counters: Redis unreachable ({exc.__class__.__name__}: {exc})") from None

    def window(self, seconds: float, now: float | None = None) -> dict[str, tuple[int, int]]:
        """adapter_id → (tokens, requests) summed over whole buckets from the one holding `now` back to
        `now - seconds` (exclusive). `seconds` is capped at `retention_s`."""
        if seconds <= 0:
            return {}
        now = time.time() if now is None else now
        seconds = min(seconds, self.retention_s)
        last = int(now // self.bucket_s)
        first = int((now - seconds) // self.bucket_s) + 1
        buckets = range(first, last + 1)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for bucket in buckets:
                pipe.hgetall(self._key("tokens", bucket))
                pipe.hgetall(self._key("requests", bucket))
            replies = pipe.execute()
        except REDIS_DOWN_ERRORS as exc:
            raise StoreUnavailable(f"demand counters: Redis unreachable ({exc.__class__.__name__}: {exc})") from None
        totals: dict[str, list[int]] = {}
        for i, reply in enumerate(replies):
            column = i % 2  # 0 = tokens, 1 = requests
            for raw_id, raw_count in reply.items():
                adapter_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                totals.setdefault(adapter_id, [0, 0])[column] += int(raw_count)
        return {a: (t, r) for a, (t, r) in totals.items()}


class DemandBuffer:
    """A replica's per-adapter token/request counts, summed in memory and flushed to DemandCounters about once a
    second (None: counted nowhere).

    The flush runs on a worker thread, one at a time: a slow or blackholed Redis (each call waiting for its
    socket timeout) never stalls the replica's event loop. A Redis outage drops the counts of that period
    (placement is approximate by design); serving never waits.
    """

    def __init__(self, counters: DemandCounters | None, flush_s: float = 1.0) -> None:
        self.counters = counters
        self.flush_s = flush_s
        self._pending: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._flushing = threading.Event()   # set while a flush thread runs

    def add(self, adapter_id: str | None, num_tokens: int) -> None:
        if adapter_id is None or self.counters is None:
            return
        with self._lock:
            entry = self._pending.setdefault(adapter_id, [0, 0])
            entry[0] += num_tokens
            entry[1] += 1

    def flush_if_due(self, now: float | None = None, *, wait: bool = False) -> None:
        """Start a flush when one is due and none is running; `wait` joins it (tests)."""
        now = time.monotonic() if now is None else now
        if self.counters is None or now - self._last_flush < self.flush_s or self._flushing.is_set():
            return
        with self._lock:
            pending, self._pending = self._pending, {}
            self._last_flush = now
        if not pending:
            return
        self._flushing.set()
        thread = threading.Thread(target=self._flush, args=(pending,), daemon=True, name="lorafleet-demand")
        thread.start()
        if wait:
            thread.join()

    def _flush(self, pending: dict[str, list[int]]) -> None:
        counters = self.counters
        assert counters is not None
        try:
            for adapter_id, (tokens, requests) in pending.items():
                try:
                    counters.record(adapter_id, tokens, requests)
                except LoRAFleetError as exc:
                    logger.warning("demand counters not recorded: %s", exc)
                    return
        finally:
            self._flushing.clear()
