"""Single-flight: concurrent calls for one key share one execution (one adapter fetch per process at a time)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class _Call:
    __slots__ = ("done", "result", "error", "num_waiters")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.num_waiters = 0


class SingleFlight:
    """`do(key, fn)`: the first caller runs fn; callers arriving before it finishes wait and share its
    result or its exception. Nothing is cached after the call completes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, _Call] = {}

    def do(self, key: str, fn: Callable[[], Any]) -> tuple[Any, bool]:
        """(fn's result, whether this caller shared another caller's execution)."""
        with self._lock:
            call = self._calls.get(key)
            is_leader = call is None
            if call is None:
                call = self._calls[key] = _Call()
            else:
                call.num_waiters += 1
        if not is_leader:
            call.done.wait()
            if call.error is not None:
                raise call.error
            return call.result, True
        try:
            call.result = fn()
            return call.result, False
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call.done.set()

    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._calls)
