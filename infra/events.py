"""Adapter change events: the registry publishes 'updated' / 'removed'; replicas listen and drop stale copies."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

EVENT_KINDS = ("updated", "removed", "resync")


@dataclass(frozen=True, slots=True)
class AdapterEvent:
    """kind 'updated' (a new current version), 'removed', or 'resync' (events may have been missed: recheck all)."""

    kind: str
    adapter_id: str
    version: int

    def __post_init__(self) -> None:
        assert self.kind in EVENT_KINDS, f"unknown event kind {self.kind!r}"

    @classmethod
    def from_message(cls, data: bytes | str) -> AdapterEvent:
        payload = json.loads(data)
        return cls(payload["event"], payload["adapter_id"], int(payload["version"]))


class EventListener:
    """A daemon thread subscribed to the registry channel; reconnects with backoff while Redis is down.

    `epoch` grows at every (re)subscribe. A copy checked against the registry while `stamp()` was e stays
    valid as long as `stamp()` is still e: no event for it can have been missed since.
    """

    def __init__(
        self, client: Any, channel: str, callback: Callable[[AdapterEvent], None], *,
        poll_s: float = 0.2, max_backoff_s: float = 2.0,
    ) -> None:
        self.redis = client
        self.channel = channel
        self.callback = callback
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.epoch = 0
        self.num_events = 0
        self.is_live = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"adapter-events:{channel}", daemon=True)

    def start(self) -> EventListener:
        self._thread.start()
        return self

    def stamp(self) -> int | None:
        """The current subscription epoch while subscribed, None while not (no copy can be trusted unchecked)."""
        return self.epoch if self.is_live else None

    def wait_live(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.is_live and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.is_live

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _subscribe(self) -> Any:
        pubsub = self.redis.pubsub()
        pubsub.subscribe(self.channel)
        # Wait for the server's confirmation: only then is every later publish guaranteed to reach us.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=self.poll_s)
            if message and message["type"] == "subscribe":
                return pubsub
        pubsub.close()
        raise TimeoutError(f"no subscribe confirmation on {self.channel}")

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._subscribe()
                self.epoch += 1
                self.is_live = True
                backoff = 0.05
                if self.epoch > 1:  # reconnected: whatever was published meanwhile is lost
                    self._deliver(AdapterEvent("resync", "", 0))
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=self.poll_s)
                    if message and message["type"] == "message":
                        self.num_events += 1
                        self._deliver_raw(message["data"])
            except Exception as exc:  # any Redis/network failure: mark not live, back off, resubscribe
                if self.is_live:
                    log.warning("adapter events: lost %s (%s: %s); reconnecting", self.channel,
                                exc.__class__.__name__, exc)
                self.is_live = False
                self.num_events += 1  # a fetch spanning the outage must not trust what it read
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                self.is_live = self.is_live and not self._stop.is_set()
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a broken connection may fail too
                        pubsub.close()
        self.is_live = False

    def _deliver_raw(self, data: bytes) -> None:
        try:
            event = AdapterEvent.from_message(data)
        except (ValueError, KeyError, TypeError, AssertionError):
            log.warning("adapter events: ignoring malformed message %r", data[:200])
            return
        self._deliver(event)

    def _deliver(self, event: AdapterEvent) -> None:
        try:
            self.callback(event)
        except Exception:
            log.exception("adapter events: callback failed on %s", event)
