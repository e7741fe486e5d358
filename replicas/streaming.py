"""Async streaming over the synchronous engine: one driver task per event loop steps the engine on a
worker thread and hands each output to the asyncio queue of its request. Also what both engines (LoRAFleet's and
the vLLM one) take as a request: prompts, their token ids, generate()'s batch arguments."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from typing import Protocol

from lorafleet.replicas.outputs import RequestOutput
from lorafleet.replicas.sampling_params import SamplingParams

Prompt = str | Seq[int]


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def prompt_token_ids(tokenizer: _Tokenizer, vocab_size: int, prompt: Prompt) -> list[int]:
    """A prompt's token ids (text encoded, ids checked against the vocabulary); ValueError if empty or out of range."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    return ids


def request_batch(prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None,
                  adapters: str | None | list[str | None]
                  ) -> tuple[list[Prompt], list[SamplingParams | None], list[str | None]]:
    """generate()'s arguments as one (prompt, params, adapter) per request: a single prompt (text or token ids) is a
    batch of one, a single params / adapter applies to every prompt; ValueError when list lengths differ."""
    is_single = isinstance(prompts, str) or bool(prompts and isinstance(prompts[0], int))
    batch: list[Prompt] = [prompts] if is_single else list(prompts)  # type: ignore[list-item, arg-type]
    num = len(batch)
    params_list = params if isinstance(params, list) else [params] * num
    adapter_list = adapters if isinstance(adapters, list) else [adapters] * num
    if len(params_list) != num or len(adapter_list) != num:
        raise ValueError("params and adapters lists must have one entry per prompt")
    return batch, params_list, adapter_list


class SteppedEngine(Protocol):
    """What streaming needs of the engine: queue and abort requests, and step them (Engine implements it)."""

    def new_request_id(self) -> str: ...

    def add_request(self, prompt: Prompt, params: SamplingParams | None, adapter_id: str | None,
                    request_id: str | None) -> str: ...

    def abort(self, request_id: str) -> None: ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...


class StreamHub:
    def __init__(self, engine: SteppedEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._driver: asyncio.Task | None = None

    async def stream(self, prompt: Prompt, params: SamplingParams | None, adapter_id: str | None,
                     request_id: str | None) -> AsyncIterator[RequestOutput]:
        engine = self.engine
        request_id = request_id or engine.new_request_id()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = queue   # registered before the request exists: no output can be missed
        finished = False
        try:
            engine.add_request(prompt, params, adapter_id, request_id)
            self._ensure_driver()
            while not finished:
                out = await queue.get()
                finished = out.finished
                if out.error is not None:
                    raise out.error
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                engine.abort(request_id)   # the consumer left early (break, cancellation, error)
                with contextlib.suppress(RuntimeError):   # no running loop: the next step drains the abort
                    self._ensure_driver()

    def _ensure_driver(self) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        engine = self.engine
        while engine.has_unfinished():
            outputs = await asyncio.to_thread(engine.step)
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
            if not outputs:
                await asyncio.sleep(0.001)   # only waiting on adapter loads
