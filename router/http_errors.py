"""The one place LoRAFleet errors become HTTP answers: OpenAI's error shape, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.infra.errors import LoRAFleetError, Overloaded

logger = logging.getLogger("lorafleet.router")

# OpenAI's `type` for each status family.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable_error"}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """{"error": {"message", "type", "param", "code"}} with `status`."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")  # e.g. 405
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    """Map validation errors, HTTP errors, LoRAFleetError and anything unexpected to OpenAI-shaped JSON."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        param = ".".join(loc) or None
        message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return error_response(400, message, code="invalid_value", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(LoRAFleetError)
    async def _ours(_: Request, exc: LoRAFleetError) -> JSONResponse:
        headers = {"Retry-After": str(retry_after_s)} if isinstance(exc, Overloaded) else None
        return error_response(exc.http_status, str(exc), code=exc.code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its traceback here; the client sees one line, no internals.
        logger.exception("unhandled error")
        return error_response(500, f"internal error ({exc.__class__.__name__})", code="internal_error")
