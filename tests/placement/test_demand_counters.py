"""DemandCounters on a real Redis, the in-memory twin, and the EWMA demand estimator."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.infra.demand import DemandCounters
from lorafleet.infra.errors import InvalidAdapterId, StoreUnavailable
from lorafleet.placement import DemandEstimator, InMemoryCounters

pytestmark = pytest.mark.timeout(300)  # a hang fails fast instead of stalling CI

T0 = 1_700_000_000.0  # a bucket boundary for bucket_s = 10


def _fill(counters):
    counters.record("a", 100, now=T0 + 1)
    counters.record("a", 50, 2, now=T0 + 9)
    counters.record("b", 7, now=T0 + 15)
    counters.record("a", 1000, now=T0 - 100)  # old: outside a 30 s window


def test_redis_counters_record_and_window(redis_prefix):
    client, prefix = redis_prefix
    counters = DemandCounters(client, prefix, bucket_s=10, retention_s=600)
    _fill(counters)
    assert counters.window(30, now=T0 + 19) == {"a": (150, 3), "b": (7, 1)}
    assert counters.window(10, now=T0 + 19) == {"b": (7, 1)}
    assert counters.window(200, now=T0 + 19)["a"] == (1150, 4)
    assert all(k.decode().startswith(f"{prefix}:demand:") for k in client.scan_iter(match=f"{prefix}:*"))
    assert client.ttl(f"{prefix}:demand:tokens:{int(T0 // 10)}") > 0


def test_in_memory_counters_match_redis_semantics(redis_prefix):
    client, prefix = redis_prefix
    redis_counters, memory = DemandCounters(client, prefix, bucket_s=10), InMemoryCounters(bucket_s=10)
    _fill(redis_counters)
    _fill(memory)
    for seconds, now in ((30, T0 + 19), (10, T0 + 19), (200, T0 + 19), (5, T0 + 1)):
        assert redis_counters.window(seconds, now=now) == memory.window(seconds, now=now)


def test_redis_down_is_store_unavailable(down_redis):
    counters = DemandCounters(down_redis, "lftest-down")
    with pytest.raises(StoreUnavailable, match="Redis unreachable"):
        counters.record("a", 1)
    with pytest.raises(StoreUnavailable, match="Redis unreachable"):
        counters.window(60)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 129, ".."])
def test_bad_adapter_ids_are_rejected(redis_prefix, bad):
    client, prefix = redis_prefix
    with pytest.raises(InvalidAdapterId):
        DemandCounters(client, prefix).record(bad, 1)


def test_ewma_first_sight_decay_and_drop():
    estimator = DemandEstimator(alpha=0.5, min_tokens_per_s=1.0)
    assert estimator.observe({"a": 100.0, "b": 10.0}, 10.0) == {"a": 10.0, "b": 1.0}
    assert estimator.observe({"a": 300.0}, 10.0) == {"a": 20.0}  # b decayed to 0.5 < 1: dropped
    assert estimator.observe({}, 10.0) == {"a": 10.0}


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=0.05, max_value=1.0), st.floats(min_value=1.0, max_value=1e6))
def test_ewma_converges_to_a_steady_rate(alpha, rate):
    estimator = DemandEstimator(alpha=alpha)
    estimator.observe({"a": 0.0001}, 1.0)
    for _ in range(400):
        estimator.observe({"a": rate * 10}, 10.0)
    assert estimator.rates["a"] == pytest.approx(rate, rel=1e-6)


def test_replay_rebuilds_the_estimate_from_counters():
    counters = InMemoryCounters(bucket_s=10)
    for k in range(6):
        counters.record("a", 100 * (k + 1), now=T0 + 10 * k + 1)
    live = DemandEstimator(alpha=0.5)
    for k in range(6):
        live.update(counters, 10, now=T0 + 10 * k + 9)
    replayed = DemandEstimator(alpha=0.5).replay(counters, 10, 6, now=T0 + 59)
    assert replayed == pytest.approx(live.rates)
