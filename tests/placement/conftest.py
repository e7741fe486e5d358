"""Shared fixtures of the placement tests: a real Redis with a unique key prefix per test."""

from __future__ import annotations

import uuid

import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_prefix():
    """(client, prefix) on the local Redis; every key under the prefix is deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"these tests need a Redis server at {REDIS_URL}")
    prefix = f"lftest-{uuid.uuid4().hex[:12]}"
    yield client, prefix
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def down_redis():
    """A client pointed at a port where no Redis listens (connection refused at once)."""
    import redis

    return redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5, socket_timeout=0.5)
