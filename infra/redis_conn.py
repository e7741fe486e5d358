"""Redis connections for the adapter store: short timeouts, and Redis failures turned into StoreUnavailable."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from lorafleet.infra.errors import StoreUnavailable

# Errors that mean "Redis is unreachable or not serving": a down Redis must fail a call fast and clearly.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
)


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A client for `url` (nothing is sent until the first command); binary replies, bounded waits."""
    # Connect fast-fails on a dead host; reads get longer since a 300 MiB blob takes a while to stream.
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=min(timeout_s, 2.0),
        socket_timeout=timeout_s,
        health_check_interval=10,
        retry_on_timeout=False,
    )


def describe(client: Any) -> str:
    """host:port (or socket path) of a client, for error messages; never the password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


@contextmanager
def unavailable_as_error(client: Any, what: str) -> Iterator[None]:
    """Turn redis connection failures inside the block into one StoreUnavailable naming `what` and the server."""
    try:
        yield
    except REDIS_DOWN_ERRORS as exc:
        raise StoreUnavailable(
            f"{what}: Redis at {describe(client)} is unreachable ({exc.__class__.__name__}: {exc})"
        ) from None
