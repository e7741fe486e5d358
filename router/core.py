"""RouterCore: what the HTTP ingress does between parsing a request and streaming the replica's answer.

Plain class (no Ray, no FastAPI): resolves `model` to an adapter id, checks the registry, sends the request to
a Backend (Ray Serve handle in production, an in-process replica in tests) and turns its stream into OpenAI
responses, recording metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from lorafleet.infra.adapter_ids import is_valid_adapter_id
from lorafleet.infra.errors import AdapterNotFound, LoRAFleetError, StoreUnavailable
from lorafleet.router.metrics import RouterMetrics
from lorafleet.router.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)


class Backend(Protocol):
    """Sends one request dict to a replica; yields its stream items (see ReplicaServer.generate)."""

    def stream(self, request: dict, adapter_id: str | None) -> AsyncIterator[dict]: ...


class ReplicaError(LoRAFleetError):
    """An error the replica reported for one request, with the HTTP status it chose."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.http_status, self.code = status, code


@dataclass(slots=True)
class RouterConfig:
    base_model_name: str = "base"
    default_max_tokens: int = 16
    max_tokens_limit: int = 4096


class RouterCore:
    def __init__(self, backend: Backend, config: RouterConfig, store: Any | None = None,
                 metrics: RouterMetrics | None = None, controller: Any | None = None) -> None:
        self.backend = backend
        self.config = config
        self.store = store  # AdapterStore (registry lookups, uploads); None = no registry check
        self.metrics = metrics or RouterMetrics()
        self.controller = controller  # PlacementController handle (POST /v1/placement/rebalance)

    # -- model names ------------------------------------------------------------------------------
    def resolve_model(self, model: str) -> str | None:
        """Adapter id for `model` (None = the base model). Accepts `id`, the base name, or `base:id`."""
        base = self.config.base_model_name
        if model == base:
            return None
        adapter_id = model.split(":", 1)[1] if model.startswith(f"{base}:") else model
        if not is_valid_adapter_id(adapter_id):
            raise AdapterNotFound(f"model '{model}' does not exist")
        if self.store is not None:
            try:
                self.store.current(adapter_id)
            except AdapterNotFound:
                raise AdapterNotFound(f"model '{model}' does not exist") from None
            except StoreUnavailable:
                pass  # registry down: let the replica try (it may hold the adapter)
        return adapter_id

    def list_models(self) -> ModelList:
        base = self.config.base_model_name
        cards = [ModelCard(id=base, root=base)]
        if self.store is not None:
            try:
                records = self.store.list_current()
            except StoreUnavailable:
                records = []
            cards += [ModelCard(id=r.adapter_id, created=int(r.created), parent=base, root=base,
                                owned_by=r.owner or "lorafleet") for r in records]
        return ModelList(data=cards)

    # -- generation -------------------------------------------------------------------------------
    def _replica_request(self, req: CompletionRequest | ChatCompletionRequest, adapter_id: str | None) -> dict:
        max_tokens = req.max_tokens or getattr(req, "max_completion_tokens", None) or self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_limit:
            raise ReplicaError(400, "invalid_value", f"max_tokens: at most {self.config.max_tokens_limit}")
        request = {
            "adapter_id": adapter_id, "max_tokens": max_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "seed": req.seed, "stop": req.stop, "request_id": new_id("req"),
        }
        if isinstance(req, ChatCompletionRequest):
            request["messages"] = [m.model_dump() for m in req.messages]
        else:
            request["prompt"] = req.prompt
        return request

    async def _items(self, request: dict, adapter_id: str | None) -> AsyncIterator[dict]:
        """Replica stream items with errors raised and metrics recorded."""
        start = time.monotonic()
        first = last = None
        num_tokens = 0
        item: dict = {}
        self.metrics.inflight.inc()
        try:
            async for item in self.backend.stream(request, adapter_id):
                if "error" in item:
                    err = item["error"]
                    raise ReplicaError(int(err["status"]), err["code"], err["message"])
                now = time.monotonic()
                if first is None:
                    first = now
                    self.metrics.ttft.labels(item.get("adapter_state", "cold")).observe(now - start)
                    self.metrics.observe_replica(item)
                    replica = str(item.get("replica_rank"))
                    self.metrics.cache_hits.labels(replica, item.get("adapter_state", "cold")).inc()
                last = now
                num_tokens = item.get("completion_tokens", num_tokens)
                yield item
        finally:
            self.metrics.inflight.dec()
        self.metrics.e2e.observe(time.monotonic() - start)
        if first is not None and last is not None and num_tokens > 1:
            self.metrics.tpot.observe((last - first) / (num_tokens - 1))
        label = adapter_id or self.config.base_model_name
        self.metrics.tokens.labels(label, "prompt").inc(item.get("prompt_tokens", 0))
        self.metrics.tokens.labels(label, "completion").inc(num_tokens)

    async def complete(self, req: CompletionRequest | ChatCompletionRequest
                       ) -> tuple[CompletionResponse | ChatCompletionResponse, int | None]:
        """The whole answer, and the rank of the replica that served it."""
        adapter_id = self.resolve_model(req.model)
        request = self._replica_request(req, adapter_id)
        text, finish, usage = [], None, Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        replica = None
        async for item in self._items(request, adapter_id):
            text.append(item["text"])
            finish = item.get("finish_reason") or finish
            usage = _usage(item)
            replica = item.get("replica_rank", replica)
        if isinstance(req, ChatCompletionRequest):
            message = ChatChoiceMessage(content="".join(text))
            choices = [ChatChoice(message=message, finish_reason=finish)]
            return ChatCompletionResponse(model=req.model, choices=choices, usage=usage), replica
        prompt = req.prompt if req.echo and isinstance(req.prompt, str) else ""
        choices = [CompletionChoice(text=prompt + "".join(text), finish_reason=finish)]
        return CompletionResponse(model=req.model, usage=usage, choices=choices), replica

    async def prepare_stream(self, req: CompletionRequest | ChatCompletionRequest) -> AsyncIterator[str]:
        """Resolve and start the request (errors raise here, before any HTTP status is sent), then SSE lines."""
        adapter_id = self.resolve_model(req.model)
        items = self._items(self._replica_request(req, adapter_id), adapter_id)
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            first = None
        return self._sse(req, first, items)

    async def _sse(self, req: CompletionRequest | ChatCompletionRequest, first: dict | None,
                   items: AsyncIterator[dict]) -> AsyncIterator[str]:
        is_chat = isinstance(req, ChatCompletionRequest)
        stream_id, created = new_id("chatcmpl" if is_chat else "cmpl"), int(time.time())

        def chunk(item: dict) -> str:
            finish = item.get("finish_reason")
            if is_chat:
                choice = {"index": 0, "delta": {"role": "assistant", "content": item["text"]},
                          "finish_reason": finish}
                body = {"id": stream_id, "object": "chat.completion.chunk", "created": created,
                        "model": req.model, "choices": [choice]}
            else:
                choice = {"index": 0, "text": item["text"], "finish_reason": finish, "logprobs": None}
                body = {"id": stream_id, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [choice]}
            if item.get("finished"):
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
        yield "data: [DONE]\n\n"


def _usage(item: dict) -> Usage:
    prompt, completion = int(item.get("prompt_tokens", 0)), int(item.get("completion_tokens", 0))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
