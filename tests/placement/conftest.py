"""Shared fixtures of the placement tests: a real Redis with a unique key prefix per test."""

from __future__ import annotations

import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def down_redis():
    """A client pointed at a port where no Redis listens (connection refused at once)."""
    from lorafleet.infra.redis_conn import connect

    return connect("redis://127.0.0.1:1/0", timeout_s=0.5)

