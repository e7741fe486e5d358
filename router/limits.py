"""Request limits at the router: the global in-flight cap, the per-request timeout and the body-size gate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

from lorafleet.infra.errors import LoRAFleetError, Overloaded
from lorafleet.router.http_errors import error_response


class RequestTimeout(LoRAFleetError):
    """A generation ran past `request_timeout_s`; it was aborted on the replica. 503: the server was too slow,
    not the client (408 would blame the client's upload)."""

    http_status = 503
    code = "request_timeout"


class BodyTooLarge(LoRAFleetError):
    http_status = 413
    code = "request_too_large"


class InflightLimiter:
    """At most `max_inflight` generations at once in this router process; the next one is Overloaded (429 with
    Retry-After) instead of waiting in an unbounded queue. One event loop per process: no lock needed."""

    def __init__(self, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight_requests must be >= 1")
        self.max_inflight = max_inflight
        self.num_inflight = 0

    def can_acquire(self) -> bool:
        return self.num_inflight < self.max_inflight

    def acquire(self) -> None:
        if not self.can_acquire():
            raise Overloaded(f"{self.num_inflight} requests in flight, the limit (max_inflight_requests) is "
                             f"{self.max_inflight}; retry later")
        self.num_inflight += 1

    def release(self) -> None:
        assert self.num_inflight > 0, "release without acquire"
        self.num_inflight -= 1


class BodySizeLimit:
    """ASGI: 413 for a request body over `get_limit(method, path)` = (bytes, setting name), by Content-Length up
    front and by counting the streamed body (chunked uploads carry no Content-Length)."""

    def __init__(self, app: Any, get_limit: Callable[[str, str], tuple[int, str]]) -> None:
        self.app, self.get_limit = app, get_limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        limit, setting = self.get_limit(scope["method"], scope["path"])
        message = f"request body over the limit of {limit} bytes ({setting})"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await error_response(413, message, code=BodyTooLarge.code)(scope, receive, send)
            return
        num_bytes = 0

        async def counted_receive() -> dict:
            nonlocal num_bytes
            event = await receive()
            if event["type"] == "http.request":
                num_bytes += len(event.get("body", b""))
                if num_bytes > limit:
                    # FastAPI turns other errors while reading the body into 400; HTTPException passes through
                    raise HTTPException(413, message)
            return event

        await self.app(scope, counted_receive, send)
