"""Helpers shared by the test modules (importable: pytest puts tests/ on sys.path via `pythonpath`)."""

from __future__ import annotations

import socket

REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def delete_prefix(client, prefix: str) -> None:
    """Delete every Redis key under `prefix:` (tests only ever touch their own prefix)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
