"""API keys and tenants: who may call which endpoint and see which adapters (plain classes, no Ray)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorafleet.infra.errors import LoRAFleetError
from lorafleet.router.http_errors import error_response
from lorafleet.router.key_store import ApiKeyStore, parse_keys

logger = logging.getLogger("lorafleet.router")


class Unauthorized(LoRAFleetError):
    """No API key, or one that is not configured."""

    http_status = 401
    code = "invalid_api_key"


class KeysUnavailable(LoRAFleetError):
    """Keys come from Redis and none could be loaded yet: a key not in the settings can be neither accepted nor
    refused (503, not 401: the key may be valid)."""

    http_status = 503
    code = "api_keys_unavailable"


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


class RedisKeys:
    """The keys of the Redis hash (`ApiKeyStore`), cached: re-read every `refresh_s` on a daemon thread, so no
    request waits on Redis and a removed key stops working within `refresh_s` (plus one Redis timeout).

    `entries` is None until a first read succeeds; afterwards a failed read keeps the last loaded keys (a Redis
    outage neither locks every tenant out nor opens the API). A read that succeeds replaces them, so an empty or
    deleted hash revokes every key in it.
    """

    def __init__(self, store: ApiKeyStore, refresh_s: float = 5.0) -> None:
        if refresh_s <= 0:
            raise ValueError("refresh_s must be > 0")
        self.store, self.refresh_s = store, refresh_s
        self.entries: list[tuple[bytes, Tenant]] | None = None   # (sha256 digest, tenant); swapped whole
        self._raw: dict[bytes, bytes] | None = None
        self._is_failing = False
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> RedisKeys:
        """One read now, then one every `refresh_s` until close() (or until this object is garbage)."""
        self.refresh()
        threading.Thread(target=_refresh_loop, args=(weakref.ref(self), self._stop, self.refresh_s), daemon=True,
                         name="lorafleet-api-keys").start()
        return self

    def close(self) -> None:
        self._stop.set()

    def refresh(self) -> bool:
        """Re-read the hash on this thread; False (keys kept) when Redis failed."""
        with self._lock:   # one read at a time: an older answer must not overwrite a newer one
            return self._refresh()

    def _refresh(self) -> bool:
        try:
            raw = self.store.read()
        except Exception as exc:   # the message names the server, never a key
            if not self._is_failing:
                kept = "none loaded yet" if self.entries is None else f"keeping the {len(self.entries)} last loaded"
                logger.warning("API keys not refreshed (%s): %s", kept, exc)
            self._is_failing = True
            return False
        if self._is_failing:
            logger.info("API keys: %s readable again", self.store.hash_key)
        self._is_failing = False
        if raw != self._raw:   # parse (and warn about bad entries) only when the hash changed
            records, problems = parse_keys(raw, self.store.hash_key)
            for problem in problems:
                logger.warning("%s", problem)
            self.entries = [(bytes.fromhex(r.digest), _tenant(r.adapter_ids)) for r in records]
            self._raw = raw
        return True


def _tenant(adapter_ids: tuple[str, ...] | None) -> Tenant:
    return Tenant(None if adapter_ids is None else frozenset(adapter_ids))


def _refresh_loop(ref: weakref.ref[RedisKeys], stop: threading.Event, period_s: float) -> None:
    # A weak reference: the thread does not keep a dropped RedisKeys (and its Redis client) alive.
    while not stop.wait(period_s):
        keys = ref()
        if keys is None:
            return
        keys.refresh()
        del keys


class ApiKeys:
    """Keys from settings, `api_keys` {key: "*" | [adapter ids]} and an optional `admin_key`, plus those of the
    Redis hash when `redis_keys` is given (then the API is never open, even before the hash is loaded).

    A presented key is hashed with sha256 and its digest compared with every known digest by hmac.compare_digest,
    without stopping at a match, so the time taken says nothing about which key (or how much of one) matched.
    Keys are never logged and never part of an error message.
    """

    def __init__(self, api_keys: dict[str, str | list[str]] | None = None, admin_key: str | None = None,
                 redis_keys: RedisKeys | None = None) -> None:
        self._keys: list[tuple[bytes, Tenant]] = []   # (sha256 digest, tenant)
        for key, scope in (api_keys or {}).items():
            if not key:
                raise ValueError("api_keys: an API key must be non-empty")
            if scope == "*":
                tenant = Tenant(None)
            elif isinstance(scope, list) and all(isinstance(a, str) for a in scope):
                tenant = Tenant(frozenset(scope))
            else:
                raise ValueError('api_keys: each value must be "*" or a list of adapter ids')
            self._keys.append((_digest(key.encode()), tenant))
        if admin_key is not None:
            if not admin_key:
                raise ValueError("admin_key must be non-empty")
            self._keys.append((_digest(admin_key.encode()), OPEN))
        self.redis_keys = redis_keys
        self.is_open = not self._keys and redis_keys is None
        self.is_inference_open = not api_keys and redis_keys is None   # only an admin key: completions need no key

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant for an `Authorization: Bearer <key>` header; raises Unauthorized (KeysUnavailable for a key
        not in the settings while the Redis keys were never loaded)."""
        if self.is_open:
            return OPEN
        presented = _bearer(authorization)
        if presented is None:
            if self.is_inference_open:
                return ANONYMOUS
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = _digest(presented)
        loaded = self.redis_keys.entries if self.redis_keys is not None else ()
        found = None
        for known, tenant in itertools.chain(self._keys, loaded or ()):
            if hmac.compare_digest(known, digest) and found is None:   # no early exit: constant time
                found = tenant
        if found is None:
            if loaded is None:
                raise KeysUnavailable("API keys are not loaded yet (Redis unreachable); retry shortly")
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

    def close(self) -> None:
        """Stop refreshing the Redis keys (tests; a router keeps its keys for its lifetime)."""
        if self.redis_keys is not None:
            self.redis_keys.close()


def api_keys_from_settings(cfg: Any) -> ApiKeys:
    """The router's keys: `api_keys` and `admin_key`, plus the Redis hash `{redis_prefix}:api_keys` when
    `api_keys_from_redis` (read once here, then every `api_keys_refresh_s` on a thread)."""
    redis_keys = None
    if cfg.api_keys_from_redis:
        from lorafleet.infra.redis_conn import connect

        client = connect(cfg.redis_url, timeout_s=min(2.0, cfg.api_keys_refresh_s))
        redis_keys = RedisKeys(ApiKeyStore(client, cfg.redis_prefix), cfg.api_keys_refresh_s).start()
    return ApiKeys(cfg.api_keys, cfg.admin_key, redis_keys)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _bearer(authorization: str | None) -> bytes | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("utf-8", "surrogateescape")


_AUTH_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "1"}}


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
            extra = _AUTH_HEADERS.get(exc.http_status)
            await error_response(exc.http_status, str(exc), code=exc.code, headers=extra)(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def tenant_of(request: Any) -> Tenant:
    """The Tenant AuthMiddleware stored on the request (OPEN when the app runs without the middleware)."""
    return getattr(request.state, "tenant", OPEN)
