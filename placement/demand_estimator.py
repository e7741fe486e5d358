"""Demand per adapter: EWMA of tokens/s over periods, read from any counter source with `window()`."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Protocol

Counts = dict[str, tuple[int, int]]  # adapter_id -> (tokens, requests)


class CounterSource(Protocol):
    """What the estimator reads: `lorafleet.infra.demand.DemandCounters` (Redis) or `InMemoryCounters`."""

    def window(self, seconds: float, now: float | None = None) -> Counts: ...


class InMemoryCounters:
    """Time-bucketed (tokens, requests) per adapter in process memory; same interface as DemandCounters."""

    def __init__(self, bucket_s: float = 10.0, retention_s: float = 3600.0) -> None:
        assert bucket_s > 0 and retention_s >= bucket_s, "need bucket_s > 0 and retention_s >= bucket_s"
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self._buckets: dict[int, dict[str, list[int]]] = defaultdict(dict)

    def record(self, adapter_id: str, num_tokens: int, num_requests: int = 1, now: float | None = None) -> None:
        bucket = int((time.time() if now is None else now) // self.bucket_s)
        counts = self._buckets[bucket].setdefault(adapter_id, [0, 0])
        counts[0] += num_tokens
        counts[1] += num_requests
        if len(self._buckets) > 2 * self.retention_s / self.bucket_s:
            oldest_kept = bucket - int(self.retention_s // self.bucket_s)
            for old in [b for b in self._buckets if b < oldest_kept]:
                del self._buckets[old]

    def window(self, seconds: float, now: float | None = None) -> Counts:
        """Sum of the whole buckets from the one holding `now` back to `now - seconds` (exclusive)."""
        now = time.time() if now is None else now
        last = int(now // self.bucket_s)
        first = int((now - seconds) // self.bucket_s) + 1
        out: dict[str, list[int]] = {}
        for bucket in range(first, last + 1):
            for adapter_id, (tokens, requests) in self._buckets.get(bucket, {}).items():
                acc = out.setdefault(adapter_id, [0, 0])
                acc[0] += tokens
                acc[1] += requests
        return {a: (t, r) for a, (t, r) in out.items()}


class DemandEstimator:
    """EWMA of tokens/s per adapter, one step per period: rate ← α·observed + (1-α)·rate.

    An adapter seen for the first time starts at its observed rate; one not seen decays by (1-α) per
    period and is dropped below `min_tokens_per_s`.
    """

    def __init__(self, alpha: float = 0.5, min_tokens_per_s: float = 1e-3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.min_tokens_per_s = min_tokens_per_s
        self._rates: dict[str, float] = {}
        self.num_updates = 0

    @property
    def rates(self) -> dict[str, float]:
        """Current estimate, tokens/s per adapter."""
        return dict(self._rates)

    def observe(self, tokens: Mapping[str, float], period_s: float) -> dict[str, float]:
        """One EWMA step from `tokens` counted over the last `period_s` seconds."""
        assert period_s > 0, "period_s must be > 0"
        keep = 1.0 - self.alpha
        rates = {a: r * keep for a, r in self._rates.items()}
        for adapter_id, count in tokens.items():
            observed = float(count) / period_s
            previous = self._rates.get(adapter_id)
            rates[adapter_id] = observed if previous is None else self.alpha * observed + keep * previous
        self._rates = {a: r for a, r in rates.items() if r >= self.min_tokens_per_s and math.isfinite(r)}
        self.num_updates += 1
        return self.rates

    def update(self, source: CounterSource, period_s: float, now: float | None = None) -> dict[str, float]:
        """One EWMA step from the counts `source` holds for the period ending at `now`."""
        counts = source.window(period_s, now)
        return self.observe({a: tokens for a, (tokens, _) in counts.items()}, period_s)

    def replay(
        self, source: CounterSource, period_s: float, num_periods: int, now: float | None = None
    ) -> dict[str, float]:
        """Rebuild the estimate from the last `num_periods` periods, oldest first (a stateless controller)."""
        now = time.time() if now is None else now
        for k in range(num_periods - 1, -1, -1):
            self.update(source, period_s, now - k * period_s)
        return self.rates
