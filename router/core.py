"""RouterCore: what the HTTP ingress does between parsing a request and streaming the replica's answer.

Plain class (no Ray, no FastAPI): resolves `model` to an adapter id, checks the registry, sends the request to
a Backend (Ray Serve handle in production, an in-process replica in tests) and turns its stream into OpenAI
responses, recording metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from lorafleet.infra.adapter_ids import is_valid_adapter_id
from lorafleet.infra.errors import AdapterNotFound, InvalidRequest, LoRAFleetError, StoreUnavailable
from lorafleet.infra.replica_api import (
    ChatTurn,
    GenerateRequest,
    ServedBy,
    StreamChunk,
    StreamError,
    StreamItem,
    TokenLogprob,
)
from lorafleet.router.auth import OPEN, ApiKeys, Tenant
from lorafleet.router.limits import InflightLimiter, RequestTimeout
from lorafleet.router.metrics import RouterMetrics
from lorafleet.router.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)

REGISTRY_RETRY_S = 2.0   # after a failed registry lookup, route without one for this long
SLOW_LOOKUP_S = 0.25     # a registry lookup running longer than this (a round trip is ~1 ms): Redis may hang
KNOWN_TTL_S = 1.0        # an adapter the registry just confirmed is not asked about again for this long
KNOWN_MAX = 100_000


class ReplicaBackend(Protocol):
    """Sends one GenerateRequest to a replica; yields its StreamItems (see ReplicaServer.generate)."""

    def stream(self, request: GenerateRequest) -> AsyncIterator[StreamItem]: ...


class InProcessBackend:
    """ReplicaBackend over a ReplicaServer in this process (no Ray handle): benchmarks, tests, single process."""

    def __init__(self, replica: Any) -> None:
        self.replica = replica

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamItem]:
        async for item in self.replica.generate(request):
            yield item


@dataclass(slots=True)
class RouterConfig:
    base_model_name: str = "base"
    router_id: str = ""   # this ingress replica (several may serve one app), named on every generation's answer
    default_max_tokens: int = 16
    max_tokens_limit: int = 4096
    max_prompt_chars: int = 200_000   # a string prompt, or the sum of chat message contents
    max_stop_strings: int = 8
    max_inflight_requests: int = 256   # generations at once in this router process; then 429
    request_timeout_s: float = 600.0   # a whole generation, stream included; then abort and 503
    max_request_bytes: int = 1 << 20   # JSON bodies; adapter uploads are bounded by the store's max_bytes

    def __post_init__(self) -> None:
        for name in ("default_max_tokens", "max_tokens_limit", "max_prompt_chars", "max_inflight_requests",
                     "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterConfig.{name} must be >= 1")
        if self.max_stop_strings < 0 or self.request_timeout_s <= 0:
            raise ValueError("RouterConfig: max_stop_strings must be >= 0 and request_timeout_s > 0")


class RouterCore:
    def __init__(self, backend: ReplicaBackend, config: RouterConfig, store: Any | None = None,
                 metrics: RouterMetrics | None = None, controller: Any | None = None,
                 auth: ApiKeys | None = None) -> None:
        self.backend = backend
        self.config = config
        self.store = store  # AdapterStore (registry lookups, uploads); None = no registry check
        self.metrics = metrics or RouterMetrics()
        self.controller = controller  # PlacementController handle (POST /v1/placement/rebalance)
        self.auth = auth or ApiKeys()   # no keys: open
        self.limiter = InflightLimiter(config.max_inflight_requests)
        self._registry_down_until = 0.0   # monotonic time before which resolve_model skips the registry
        self._lookups: dict[int, float] = {}   # registry lookups under way (event loop only) -> start time
        # adapter id -> (until when the registry's "exists" holds here, its max rank, its PEFT type)
        self._known: dict[str, tuple[float, int, str]] = {}

    # -- model names ------------------------------------------------------------------------------
    def resolve_model(self, model: str, tenant: Tenant = OPEN, *, check_registry: bool = True) -> str | None:
        """Adapter id for `model` (None = the base model). Accepts `id`, the base name, or `base:id`.
        Another tenant's adapter is 'does not exist' (404, not 403), decided before the registry is asked."""
        base = self.config.base_model_name
        if model == base:
            return None
        adapter_id = model.split(":", 1)[1] if model.startswith(f"{base}:") else model
        if not is_valid_adapter_id(adapter_id) or not tenant.can_use(adapter_id):
            raise AdapterNotFound(f"model '{model}' does not exist")
        now = time.monotonic()
        if (check_registry and self.store is not None and now >= self._registry_down_until
                and self._known_until(adapter_id) < now):
            try:
                record = self.store.current(adapter_id)
                if len(self._known) > KNOWN_MAX:
                    self._known.clear()
                self._known[adapter_id] = (now + KNOWN_TTL_S, record.max_rank, record.peft_type)
            except AdapterNotFound:
                raise AdapterNotFound(f"model '{model}' does not exist") from None
            except StoreUnavailable:
                # Registry down or hanging: let the replica try (it may hold the adapter), and skip the registry
                # for REGISTRY_RETRY_S, so a blackholed Redis costs one request its timeout, not every request.
                self._registry_down_until = time.monotonic() + REGISTRY_RETRY_S
        return adapter_id

    def _known_until(self, adapter_id: str) -> float:
        known = self._known.get(adapter_id)
        return 0.0 if known is None else known[0]

    async def _resolve(self, model: str, tenant: Tenant) -> str | None:
        """resolve_model off the event loop when it asks the registry (a Redis round trip; after a Redis loss, the
        registry's rebuild from the object store), so one slow lookup does not stall every stream."""
        now, base = time.monotonic(), self.config.base_model_name
        adapter_id = model.split(":", 1)[1] if model.startswith(f"{base}:") else model
        if self.store is None or model == base or self._known_until(adapter_id) >= now:
            return self.resolve_model(model, tenant)   # no registry round trip: nothing to take off the loop
        if now < self._registry_down_until or any(now - t > SLOW_LOOKUP_S for t in self._lookups.values()):
            # Redis failed lately, or a lookup already hangs: route without the registry instead of queueing
            # every request (and a worker thread each) behind the same timeout.
            return self.resolve_model(model, tenant, check_registry=False)
        token = object()
        self._lookups[id(token)] = now
        try:
            return await asyncio.to_thread(self.resolve_model, model, tenant)
        finally:
            del self._lookups[id(token)]

    def list_models(self, tenant: Tenant = OPEN) -> ModelList:
        base = self.config.base_model_name
        cards = [ModelCard(id=base, root=base)]
        if self.store is not None:
            try:
                records = self.store.list_current()
            except StoreUnavailable:
                records = []
            records = [r for r in records if tenant.can_use(r.adapter_id)]
            cards += [ModelCard(id=r.adapter_id, created=int(r.created), parent=base, root=base,
                                owned_by=r.owner or "lorafleet") for r in records]
        return ModelList(data=cards)

    # -- generation -------------------------------------------------------------------------------
    def _replica_request(self, req: CompletionRequest | ChatCompletionRequest, adapter_id: str | None
                         ) -> GenerateRequest:
        max_tokens = req.max_tokens or getattr(req, "max_completion_tokens", None) or self.config.default_max_tokens
        cfg = self.config
        if max_tokens > cfg.max_tokens_limit:
            raise InvalidRequest(f"max_tokens: at most {cfg.max_tokens_limit} (max_tokens_limit)")
        if len(req.stop or []) > cfg.max_stop_strings:
            raise InvalidRequest(f"stop: at most {cfg.max_stop_strings} stop strings (max_stop_strings)")
        num_chars = (sum(len(m.content) for m in req.messages) if isinstance(req, ChatCompletionRequest)
                     else len(req.prompt) if isinstance(req.prompt, str) else 0)
        if num_chars > cfg.max_prompt_chars:
            raise InvalidRequest(f"prompt has {num_chars} characters; at most {cfg.max_prompt_chars} "
                                 "(max_prompt_chars)")
        is_chat = isinstance(req, ChatCompletionRequest)
        # The registry's rank and type of the adapter, as last looked up (kept past KNOWN_TTL_S: a version's rank
        # rarely changes, and a replica that cannot run a new one answers why), for the request router.
        _, rank, peft_type = self._known.get(adapter_id or "", (0.0, None, None))
        return GenerateRequest(
            request_id=new_id("req"), adapter_id=adapter_id, adapter_rank=rank, adapter_type=peft_type,
            max_tokens=max_tokens, temperature=req.temperature,
            top_p=req.top_p, seed=req.seed, stop=tuple(req.stop or ()), logprobs=req.num_logprobs,
            messages=tuple(ChatTurn(m.role, m.content) for m in req.messages) if is_chat else None,
            prompt=None if is_chat else (req.prompt if isinstance(req.prompt, str) else tuple(req.prompt)),
        )

    async def _items(self, request: GenerateRequest) -> AsyncGenerator[StreamChunk, None]:
        """Replica stream items with errors raised and metrics recorded. Holds one in-flight slot (Overloaded
        when none is free) until the stream ends; past request_timeout_s the replica stream is closed, which
        aborts the generation there, and RequestTimeout is raised."""
        self.limiter.acquire()
        start = time.monotonic()
        deadline = start + self.config.request_timeout_s
        first = last = None
        num_tokens = num_prompt_tokens = 0
        self.metrics.inflight.inc()
        stream = aiter(self.backend.stream(request))
        try:
            while True:
                try:
                    item = await asyncio.wait_for(anext(stream), deadline - time.monotonic())
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise RequestTimeout(f"no answer within {self.config.request_timeout_s}s "
                                         "(request_timeout_s); the generation was aborted") from None
                if isinstance(item, StreamError):   # the same error type as on the replica (by code)
                    raise item.to_exception()
                now = time.monotonic()
                if first is None:
                    first = now
                    if item.served_by is not None:
                        self.metrics.observe_first(item.served_by, now - start)
                last = now
                num_tokens, num_prompt_tokens = item.completion_tokens, item.prompt_tokens
                yield item
        finally:
            # The client left, timed out or failed: close the replica stream now (not at garbage collection), so
            # the engine aborts the request and frees its KV blocks and adapter pin.
            await _close(stream)
            self.metrics.inflight.dec()
            self.limiter.release()
        self.metrics.e2e.observe(time.monotonic() - start)
        if first is not None and last is not None and num_tokens > 1:
            self.metrics.tpot.observe((last - first) / (num_tokens - 1))
        label = request.adapter_id or self.config.base_model_name
        self.metrics.tokens.labels(label, "prompt").inc(num_prompt_tokens)
        self.metrics.tokens.labels(label, "completion").inc(num_tokens)

    async def complete(self, req: CompletionRequest | ChatCompletionRequest, tenant: Tenant = OPEN
                       ) -> tuple[CompletionResponse | ChatCompletionResponse, ServedBy | None]:
        """The whole answer, and which replica served it (rank, where the adapter was)."""
        adapter_id = await self._resolve(req.model, tenant)
        request = self._replica_request(req, adapter_id)
        text, finish, usage = [], None, Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        served_by, entries = None, list[TokenLogprob]()
        async with aclosing(self._items(request)) as items:   # release the slot on any exit
            async for item in items:
                text.append(item.text)
                entries += item.logprobs or ()
                finish = item.finish_reason or finish
                usage = _usage(item)
                served_by = item.served_by or served_by
        if isinstance(req, ChatCompletionRequest):
            message = ChatChoiceMessage(content="".join(text))
            chat_logprobs = None if req.num_logprobs is None else ChatLogprobs.from_entries(entries)
            choices = [ChatChoice(message=message, finish_reason=finish, logprobs=chat_logprobs)]
            return ChatCompletionResponse(model=req.model, choices=choices, usage=usage), served_by
        prompt = req.prompt if req.echo and isinstance(req.prompt, str) else ""
        # With echo, only the completion's tokens have logprobs (no prompt logprobs); offsets count the prompt.
        logprobs = None if req.num_logprobs is None else CompletionLogprobs.from_entries(entries, len(prompt))
        choices = [CompletionChoice(text=prompt + "".join(text), finish_reason=finish, logprobs=logprobs)]
        return CompletionResponse(model=req.model, usage=usage, choices=choices), served_by

    async def prepare_stream(self, req: CompletionRequest | ChatCompletionRequest, tenant: Tenant = OPEN
                             ) -> AsyncIterator[str]:
        """Resolve and start the request (errors raise here, before any HTTP status is sent), then SSE lines.
        Closing the returned iterator closes the replica stream (the generation is aborted)."""
        adapter_id = await self._resolve(req.model, tenant)
        items = self._items(self._replica_request(req, adapter_id))
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await items.aclose()
            raise
        return self._sse(req, first, items)

    async def _sse(self, req: CompletionRequest | ChatCompletionRequest, first: StreamChunk | None,
                   items: AsyncGenerator[StreamChunk, None]) -> AsyncIterator[str]:
        is_chat = isinstance(req, ChatCompletionRequest)
        stream_id, created = new_id("chatcmpl" if is_chat else "cmpl"), int(time.time())
        text_offset = 0   # completions: where the next chunk's first token starts in the whole text

        def chunk(item: StreamChunk) -> str:
            nonlocal text_offset
            finish = item.finish_reason
            entries = item.logprobs or ()
            logprobs = None
            if is_chat:
                if req.num_logprobs is not None:
                    logprobs = ChatLogprobs.from_entries(entries).model_dump()
                choice = {"index": 0, "delta": {"role": "assistant", "content": item.text},
                          "logprobs": logprobs, "finish_reason": finish}
                body = {"id": stream_id, "object": "chat.completion.chunk", "created": created,
                        "model": req.model, "choices": [choice]}
            else:
                if req.num_logprobs is not None:
                    logprobs = CompletionLogprobs.from_entries(entries, text_offset).model_dump()
                    text_offset += sum(len(e.token) for e in entries)
                choice = {"index": 0, "text": item.text, "finish_reason": finish, "logprobs": logprobs}
                body = {"id": stream_id, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [choice]}
            if item.finished:
                body["usage"] = _usage(item).model_dump()
            return f"data: {json.dumps(body)}\n\n"

        try:
            if first is not None:
                yield chunk(first)
            async for item in items:
                yield chunk(item)
        except LoRAFleetError as exc:  # mid-stream failure: the status is already sent; report in-band
            err = {"message": str(exc), "type": "server_error", "param": None, "code": exc.code}
            yield f"data: {json.dumps({'error': err})}\n\n"
        finally:
            await items.aclose()   # a no-op after the end; on an early close it aborts the generation
        yield "data: [DONE]\n\n"


async def _close(stream: AsyncIterator[StreamItem]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _usage(item: StreamChunk) -> Usage:
    prompt, completion = item.prompt_tokens, item.completion_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
