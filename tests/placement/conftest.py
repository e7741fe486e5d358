"""Shared fixtures of the placement tests: a real Redis with a unique key prefix per test."""

from __future__ import annotations

import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def down_redis():
    """A client pointed at a port where no Redis listens (connection refused at once)."""
    import redis

    return redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5, socket_timeout=0.5)
