"""API keys and tenants: who may call which endpoint and see which adapters (plain classes, no Ray)."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorafleet.infra.errors import LoRAFleetError
from lorafleet.router.errors import error_response


class Unauthorized(LoRAFleetError):
    """No API key, or one that is not configured."""

    http_status = 401
    code = "invalid_api_key"


class PermissionDenied(LoRAFleetError):
    """A valid key that may not call this endpoint (adapter writes and rebalance need the admin key)."""

    http_status = 403
    code = "permission_denied"


@dataclass(frozen=True, slots=True)
class Tenant:
    """What one caller may do: `adapter_ids` None = every adapter."""

    adapter_ids: frozenset[str] | None = None
    is_admin: bool = False

    def can_use(self, adapter_id: str | None) -> bool:
        """The base model (None) is everyone's; a bound key sees only its adapters."""
        return adapter_id is None or self.adapter_ids is None or adapter_id in self.adapter_ids


OPEN = Tenant(None, is_admin=True)   # no keys configured: everything is allowed
ANONYMOUS = Tenant(None, is_admin=False)   # only an admin key configured: inference stays open

# Routes that need the admin key: adapter writes and rebalance.
_ADMIN_ROUTES = [("POST", re.compile(r"^/v1/adapters/?$")), ("DELETE", re.compile(r"^/v1/adapters/.+")),
                 ("POST", re.compile(r"^/v1/placement/rebalance/?$"))]


def is_admin_route(method: str, path: str) -> bool:
    return any(method == m and pattern.match(path) for m, pattern in _ADMIN_ROUTES)


class ApiKeys:
    """Keys from settings: `api_keys` {key: "*" | [adapter ids]} and an optional `admin_key`.

    Every presented key is compared with every configured key by hmac.compare_digest, without stopping at a
    match, so the time taken says nothing about which key (or how much of one) matched. Keys are never logged
    and never part of an error message.
    """

    def __init__(self, api_keys: dict[str, str | list[str]] | None = None, admin_key: str | None = None) -> None:
        self._keys: list[tuple[bytes, Tenant]] = []
        for key, scope in (api_keys or {}).items():
            if not key:
                raise ValueError("api_keys: an API key must be non-empty")
            if scope == "*":
                tenant = Tenant(None)
            elif isinstance(scope, list) and all(isinstance(a, str) for a in scope):
                tenant = Tenant(frozenset(scope))
            else:
                raise ValueError('api_keys: each value must be "*" or a list of adapter ids')
            self._keys.append((key.encode(), tenant))
        if admin_key is not None:
            if not admin_key:
                raise ValueError("admin_key must be non-empty")
            self._keys.append((admin_key.encode(), OPEN))
        self.is_open = not self._keys
        self.is_inference_open = not api_keys   # only an admin key: completions need no key

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant for an `Authorization: Bearer <key>` header; raises Unauthorized."""
        if self.is_open:
            return OPEN
        presented = _bearer(authorization)
        if presented is None:
            if self.is_inference_open:
                return ANONYMOUS
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        found = None
        for key, tenant in self._keys:
            if hmac.compare_digest(key, presented) and found is None:   # no early exit: constant time
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def authorize(self, authorization: str | None, method: str, path: str) -> Tenant:
        """authenticate(), then PermissionDenied for a non-admin key on an admin route."""
        tenant = self.authenticate(authorization)
        if not tenant.is_admin and is_admin_route(method, path):
            if tenant is ANONYMOUS:
                raise Unauthorized(f"missing API key: {method} {path} needs the admin key")
            raise PermissionDenied(f"{method} {path} needs the admin key")
        return tenant


def _bearer(authorization: str | None) -> bytes | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("utf-8", "surrogateescape")


class AuthMiddleware:
    """ASGI: checks the key of every /v1/ request before the body is read; the Tenant goes to
    `scope["state"]["tenant"]` (request.state.tenant). /healthz, /metrics and the OpenAPI docs stay open."""

    def __init__(self, app: Any, get_keys: Callable[[], ApiKeys]) -> None:
        self.app, self.get_keys = app, get_keys

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        try:
            tenant = self.get_keys().authorize(authorization, scope["method"], scope["path"])
        except LoRAFleetError as exc:   # raised outside the exception handlers: answer here
            extra = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
            await error_response(exc.http_status, str(exc), code=exc.code, headers=extra)(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def tenant_of(request: Any) -> Tenant:
    """The Tenant AuthMiddleware stored on the request (OPEN when the app runs without the middleware)."""
    return getattr(request.state, "tenant", OPEN)
