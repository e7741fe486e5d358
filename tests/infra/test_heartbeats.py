"""Replica heartbeats in Redis: live ranks follow the beats and their TTL, the beat thread, Redis down."""

from __future__ import annotations

import time

import pytest

from lorafleet.infra.errors import StoreUnavailable
from lorafleet.infra.heartbeats import ReplicaLiveness, start_heartbeat
from lorafleet.infra.redis_conn import connect


def test_live_ranks_follow_heartbeats_and_their_ttl(redis_prefix):
    client, prefix = redis_prefix
    liveness = ReplicaLiveness(client, prefix)
    assert liveness.live_ranks(4) is None   # nobody beats: unknown, not "all dead"
    liveness.beat(2, {"queue_len": 3})
    liveness.beat(0, ttl_s=0.2)
    assert liveness.live_ranks(4) is None   # none known dead (ranks 1 and 3 never beat: still starting)
    time.sleep(0.35)
    assert liveness.live_ranks(4) == [1, 2, 3]   # rank 0 beat, then stopped: dead after its TTL
    assert liveness.live_ranks(1) is None   # every asked rank silent: unknown, not "all dead"
    liveness.beat(0)
    assert liveness.live_ranks(4) is None   # back


def test_heartbeat_thread_beats_until_stopped(redis_prefix):
    client, prefix = redis_prefix
    liveness = ReplicaLiveness(client, prefix)
    rank: list[int | None] = [None]
    stop = start_heartbeat(liveness, lambda: rank[0], lambda: {"queue_len": 0}, period_s=0.05)
    try:
        time.sleep(0.2)
        assert not client.exists(f"{prefix}:replicas:seen")   # no rank yet: nothing written
        rank[0] = 1
        deadline = time.monotonic() + 5
        while not client.exists(f"{prefix}:replicas:live:1"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.smembers(f"{prefix}:replicas:seen") == {b"1"}
    finally:
        stop.set()


def test_redis_down_is_one_store_unavailable():
    down = connect("redis://127.0.0.1:1/0", timeout_s=0.5)   # nothing listens: connection refused at once
    with pytest.raises(StoreUnavailable, match="replica heartbeats: Redis unreachable"):
        ReplicaLiveness(down, "x").live_ranks(3)
