"""The HTTP ingress (FastAPI on Ray Serve); the placement controller it calls is placement/controller.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import anyio
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from lorafleet.infra.errors import (
    AdapterNotFound,
    AdapterTooLarge,
    Overloaded,
    ReplicaUnavailable,
    StoreUnavailable,
)
from lorafleet.infra.replica_api import GenerateRequest, StreamItem
from lorafleet.router.auth import AuthMiddleware, Tenant, api_keys_from_settings, tenant_of
from lorafleet.router.core import RouterConfig, RouterCore
from lorafleet.router.http_errors import install_error_handlers
from lorafleet.router.limits import BodySizeLimit
from lorafleet.router.metrics import RequestCounter
from lorafleet.router.schemas import ChatCompletionRequest, CompletionRequest, ModelList

logger = logging.getLogger("lorafleet.router")
REPLICA_HEADER = "x-lorafleet-replica"  # rank of the replica that served a non-streaming request
ADAPTER_STATE_HEADER = "x-lorafleet-adapter-state"   # where its adapter was: base, device, host or cold
ROUTER_HEADER = "x-lorafleet-router"   # which ingress replica answered (several may serve one app)
UPLOAD_OVERHEAD_BYTES = 2 << 20  # adapter_config.json (at most 1 MiB) and the multipart framing


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends, so a client that goes away aborts the generation at
    once (Starlette only cancels the sending task, leaving the generator to the garbage collector)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


def create_app(get_core: Callable[[], RouterCore]) -> FastAPI:
    """The OpenAI-compatible API; every route asks `get_core()` for the RouterCore of this process."""
    app = FastAPI(title="LoRAFleet", version="0.1.0",
                  description="OpenAI-compatible serving of many adapters of one base model.")
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, get_limit=lambda method, path: _body_limit(get_core(), method, path))
    app.add_middleware(AuthMiddleware, get_keys=lambda: get_core().auth)
    app.add_middleware(RequestCounter, get_metrics=lambda: get_core().metrics)  # added last: runs first

    async def generate(req: CompletionRequest | ChatCompletionRequest, tenant: Tenant) -> Response:
        core = get_core()
        if req.stream:
            lines = await core.prepare_stream(req, tenant)
            return ClosingStreamingResponse(lines, media_type="text/event-stream")
        body, served_by = await core.complete(req, tenant)
        headers = {ROUTER_HEADER: core.config.router_id} if core.config.router_id else {}
        if served_by is not None:
            headers[ADAPTER_STATE_HEADER] = served_by.adapter_state
            if served_by.replica_rank is not None:
                headers[REPLICA_HEADER] = str(served_by.replica_rank)
        return JSONResponse(body.model_dump(), headers=headers)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await generate(req, tenant_of(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await generate(req, tenant_of(request))

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        return await asyncio.to_thread(get_core().list_models, tenant_of(request))

    @app.get("/v1/adapters")
    async def list_adapters(request: Request) -> dict:
        tenant = tenant_of(request)
        if tenant.adapter_ids is not None and not tenant.adapter_ids:
            return {"object": "list", "data": []}  # a key bound to no adapters: nothing to ask the store
        store = _store(get_core())
        records = await asyncio.to_thread(store.list_current)
        return {"object": "list", "data": [_record(r) for r in records if tenant.can_use(r.adapter_id)]}

    @app.get("/v1/adapters/{adapter_id}")
    async def show_adapter(adapter_id: str, request: Request) -> dict:
        if not tenant_of(request).can_use(adapter_id):  # before the store: ids of others do not leak
            raise AdapterNotFound(f"adapter '{adapter_id}' does not exist")
        store = _store(get_core())
        return _record(await asyncio.to_thread(store.current, adapter_id))

    @app.post("/v1/adapters", status_code=201)
    async def upload_adapter(adapter_id: str = Form(..., alias="id"),
                             adapter_config: UploadFile = File(..., description="adapter_config.json"),
                             adapter_model: UploadFile = File(..., description="adapter_model.safetensors")) -> dict:
        store = _store(get_core())
        files = {"adapter_config.json": await _read(adapter_config, 1 << 20),
                 "adapter_model.safetensors": await _read(adapter_model, store.max_bytes)}
        record = await asyncio.to_thread(store.push, adapter_id, files=files)
        return _record(record)

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(adapter_id: str, purge: bool = False) -> dict:
        store = _store(get_core())
        return await asyncio.to_thread(store.remove, adapter_id, purge=purge)

    @app.get("/v1/placement")
    async def placement(request: Request) -> dict:
        core = get_core()
        tenant = tenant_of(request)
        table = await asyncio.to_thread(_load_table, core)
        body = {"version": 0, "num_replicas": 0, "entries": {}} if table is None else table.to_dict()
        body["entries"] = {a: e for a, e in body["entries"].items() if tenant.can_use(a)}  # tenants see theirs
        return body

    @app.post("/v1/placement/rebalance")
    async def rebalance() -> dict:
        controller = get_core().controller
        if controller is None:
            raise StoreUnavailable("no placement controller is running")
        report = await controller.rebalance.remote()
        if report is None:
            raise StoreUnavailable("rebalance failed: see the placement controller's log")
        return report

    @app.get("/healthz")
    async def healthz() -> dict:
        core = get_core()
        redis_ok = core.store is not None and await asyncio.to_thread(_redis_ok, core.store)
        return {"status": "ok", "redis": "ok" if redis_ok else "unavailable"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(get_core().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _body_limit(core: RouterCore, method: str, path: str) -> tuple[int, str]:
    """Bytes a request body may have, and the setting that says so: adapter uploads up to the store's max_bytes
    (plus the config file and framing), JSON up to max_request_bytes."""
    if method == "POST" and path.rstrip("/") == "/v1/adapters" and core.store is not None:
        return int(core.store.max_bytes) + UPLOAD_OVERHEAD_BYTES, "max_adapter_bytes"
    return core.config.max_request_bytes, "max_request_bytes"


def _store(core: RouterCore) -> Any:
    if core.store is None:
        raise StoreUnavailable("this router has no adapter store configured")
    return core.store


async def _read(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise AdapterTooLarge(f"{upload.filename or 'upload'}: over the limit of {limit} bytes")
    return data


def _record(record: Any) -> dict:
    return {"id": record.adapter_id, "version": record.version, "peft_type": record.peft_type,
            "max_rank": record.max_rank, "num_bytes": record.num_bytes, "created": record.created,
            "owner": record.owner}


def _load_table(core: RouterCore) -> Any:
    from lorafleet.placement.table_store import RoutingTableStore

    store = _store(core)
    return RoutingTableStore(store.redis, store.prefix).load()


def _redis_ok(store: Any) -> bool:
    try:
        return bool(store.redis.ping())
    except Exception:
        return False


class ServeBackend:
    """ReplicaBackend over the replica deployment's handle: multiplexed_model_id carries the adapter id to the
    RequestRouter, which picks the replica from the routing table."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamItem]:
        handle = self.handle.options(stream=True, multiplexed_model_id=request.adapter_id or "")
        responses = None
        try:
            responses = handle.stream.remote(request)   # may refuse at once (BackPressureError): inside the try
            async for item in responses:
                yield item
        except BackPressureError as exc:  # every replica is full and the handle queue is at max_queued_requests
            raise Overloaded(f"all replicas are busy and {exc.args[0]} requests are queued (max_queued_requests is "
                             f"{exc.args[1]}); retry later") from None
        except RayActorError as exc:  # the replica died (or is unreachable) under this request: 503, not 500
            raise ReplicaUnavailable(f"the replica serving this request is gone ({exc.__class__.__name__}); "
                                     "retry") from None
        finally:
            if responses is not None:
                # Closed early (client gone, timeout): cancel on the replica, which aborts there. cancel() re-raises
                # a failed assignment's error (BackPressureError), already answered above: nothing left to cancel.
                with contextlib.suppress(Exception):
                    responses.cancel()


def router_config(cfg: Any) -> RouterConfig:
    """The router's limits from Settings."""
    return RouterConfig(cfg.base_model_name, max_tokens_limit=cfg.max_tokens_limit,
                        max_prompt_chars=cfg.max_prompt_chars, max_stop_strings=cfg.max_stop_strings,
                        max_inflight_requests=cfg.max_inflight_requests, request_timeout_s=cfg.request_timeout_s,
                        max_request_bytes=cfg.max_request_bytes)


_process: dict[str, RouterCore] = {}


# Serve pickles the ingress class and `app` by value, copying any dict they name; these two named module
# functions are pickled by reference, so both sides reach this module's one `_process` in the replica.
def process_core() -> RouterCore:
    """This process's RouterCore."""
    return _process["core"]


def install_core(core: RouterCore) -> None:
    _process["core"] = core


app = create_app(process_core)


# Above the router's own max_inflight_requests (default 256), so the router answers 429 rather than Serve queueing.
@serve.deployment(name="router", max_ongoing_requests=1024)
@serve.ingress(app)
class RouterDeployment:
    """The ingress: one RouterCore per process, over the replica deployment's handle."""

    def __init__(self, replica_handle: Any, settings: dict | None = None, controller: Any = None) -> None:
        from lorafleet.infra.config import load_settings
        from lorafleet.infra.store import AdapterStore

        cfg = load_settings(**(settings or {}))
        store = AdapterStore.from_settings(cfg, base=cfg.model_dir)
        config = replace(router_config(cfg), router_id=serve.get_replica_context().replica_id.unique_id)
        install_core(RouterCore(ServeBackend(replica_handle), config, store, controller=controller,
                                auth=api_keys_from_settings(cfg)))
