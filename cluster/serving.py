"""Run the Serve app: on a local Ray started here (demo, tests) or an existing cluster; stop cleanly on a signal."""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lorafleet.infra.config import Settings

APP_NAME = "lorafleet"


@contextmanager
def serve_app(settings: Settings, *, address: str | None = None, num_cpus: int | None = None,
              wait_s: float = 180.0) -> Iterator[str]:
    """Start Ray (local unless `address`), run the app on settings.http_host:http_port; yield its base URL.

    On exit: delete the app, shut Serve down, and stop the local Ray this started (no process left behind).
    """
    import ray
    from ray import serve

    from lorafleet.cluster.app import build

    started_ray = not ray.is_initialized()
    if started_ray:
        handlers = {s: signal.getsignal(s) for s in _SIGNALS}
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        for s, handler in handlers.items():  # ray.init replaces SIGTERM with sys.exit(15): keep the caller's
            if callable(handler):
                signal.signal(s, handler)
    try:
        serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
        serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{settings.http_host}:{settings.http_port}"
        _wait_healthy(url, wait_s)
        yield url
    finally:
        try:
            serve.delete(APP_NAME)
            serve.shutdown()
        finally:
            if started_ray:
                # Free this session's object refs and actor handles held only by reference cycles while the core
                # worker is up: one collected after ray.shutdown() (from whatever thread the GC runs on) calls
                # into the shut-down core worker, which then quick-exits the whole process.
                gc.collect()
                ray.shutdown()


def _wait_healthy(url: str, wait_s: float) -> None:
    import httpx

    deadline = time.monotonic() + wait_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=2.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{exc.__class__.__name__}: {exc}"
        time.sleep(0.5)
    raise TimeoutError(f"the app at {url} did not become healthy in {wait_s:.0f}s (last: {last})")


class Shutdown(Exception):
    """SIGINT or SIGTERM arrived: unwind (stopping the app and the local Ray) and exit 0."""


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT / SIGTERM raise Shutdown in the main thread for the whole block, startup included.

    Ray's own failure-signal handler (absl) would turn SIGTERM into an abort of the driver, skipping cleanup:
    it is disabled for this process before Ray starts.
    """
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    previous = {s: signal.signal(s, _raise_shutdown) for s in _SIGNALS}
    try:
        yield
    except Shutdown:
        pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_shutdown(signum: int, _frame: object) -> None:
    raise Shutdown(signal.Signals(signum).name)


def wait_forever() -> None:
    """Sleep until SIGINT / SIGTERM raises Shutdown (inside stop_on_signals)."""
    while True:
        time.sleep(3600)
