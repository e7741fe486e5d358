"""Engine: one model, many adapters, continuous batching. add_request / step / abort, generate, stream."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from lorafleet.infra.adapter_source import AdapterSource
from lorafleet.infra.base_spec import BaseModelSpec
from lorafleet.infra.errors import InvalidAdapter, Overloaded
from lorafleet.replicas.adapter_cache import AdapterCache
from lorafleet.replicas.config import EngineConfig
from lorafleet.replicas.engine_setup import EngineParts, build_parts
from lorafleet.replicas.outputs import RequestMetrics, RequestOutput
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.replicas.scheduler import ScheduledSeq
from lorafleet.replicas.sequence import Sequence
from lorafleet.replicas.streaming import Prompt, StreamHub, prompt_token_ids, request_batch
from lorafleet.replicas.tokenizer import find_stop


class Engine:
    """Offline and streaming inference for a Llama-family model with per-request LoRA / FLoRA / IA3 adapters.

    Thread-safety: add_request and abort may be called from any thread (they queue work for the next
    step); step() runs on one thread at a time.
    """

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None,
                 adapter_source: AdapterSource | None = None) -> None:
        self.config = config or EngineConfig()
        self.model_dir = Path(model_dir)
        parts: EngineParts = build_parts(self.model_dir, self.config, adapter_source)
        self.model_config = parts.model_config
        self.tokenizer = parts.tokenizer
        self.max_model_len = parts.max_model_len
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.sampler = parts.sampler
        self.adapters: AdapterCache = parts.adapters
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self._inbox: deque[tuple[str, Any]] = deque()
        self._inbox_lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._unfinished_ids: set[str] = set()
        self._ids = itertools.count()
        self._streams = StreamHub(self)
        self.num_steps = 0

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, config: EngineConfig | None = None,
                        adapter_source: AdapterSource | None = None, **overrides: object) -> Engine:
        """Engine for a Hugging Face model directory; keyword overrides are EngineConfig fields."""
        if config is not None and overrides:
            raise TypeError("pass either config= or EngineConfig fields as keywords, not both")
        return cls(model_dir, config or EngineConfig.from_kwargs(**overrides), adapter_source)

    @property
    def base_spec(self) -> BaseModelSpec:
        return self.adapters.spec

    # -- adapters -----------------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, path: str | Path) -> dict:
        """Validate a PEFT LoRA / IA3 or LoRAFleet FLoRA directory and serve it as adapter_id (replacing an
        older version; running requests finish on the old one). InvalidAdapter names the file and field."""
        return self.adapters.load(adapter_id, path).summary()

    def unload_adapter(self, adapter_id: str) -> bool:
        return self.adapters.unload(adapter_id)

    def assign_adapters(self, adapter_ids: list[str], sizes: dict[str, int] | None = None) -> int:
        """The routing table's adapters for this replica, in priority order: fetched now as far as the host tier
        holds them (`sizes`: bytes), installed on the device as room allows (at the next step, or
        install_assigned()); returns how many fetches started."""
        return self.adapters.assign(adapter_ids, sizes)

    def install_assigned(self) -> int:
        """Install fetched assigned adapters now (an idle replica has no step to do it); between steps only."""
        with self._step_lock:
            return self.adapters.install_assigned()

    # -- requests -----------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, adapter_id: str | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Bad prompts or params raise ValueError here; adapter problems
        (invalid id, missing, invalid files) fail this request in a later step's output instead."""
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}")
        request_id = request_id or self.new_request_id()
        with self._inbox_lock:
            if request_id in self._unfinished_ids:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._unfinished_ids.add(request_id)
        seq = Sequence(request_id, prompt_ids, params, adapter_id, time.monotonic())
        seq.detok = self.tokenizer.detokenizer(prompt_ids, params.skip_special_tokens)
        if params.seed is not None:
            seq.generator = self.sampler.new_generator(params.seed)
        error = None
        if adapter_id is not None:
            try:
                self.adapters.watch(adapter_id)   # starts the fetch now: prefetch while the request queues
            except InvalidAdapter as exc:
                error = exc
        with self._inbox_lock:
            self._inbox.append(("add", seq) if error is None else ("fail", (seq, error)))
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its final output (finish_reason 'abort') comes from the next step."""
        with self._inbox_lock:
            self._inbox.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One scheduling + forward + sampling round; outputs of every request that changed."""
        with self._step_lock:
            outputs = self._drain_inbox()
            self.adapters.install_assigned()   # prefetched adapters into free room, before the scheduler pins
            sched = self.scheduler.schedule()
            for seq in sched.failed:
                outputs.append(self._finalize(seq))
            if sched.scheduled:
                self._run(sched.scheduled, outputs)
            self.num_steps += 1
            return outputs

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: str | None | list[str | None] = None) -> list[RequestOutput]:
        """Run prompts to completion (this call drives the engine); outputs in prompt order.
        A request whose adapter is missing or invalid comes back with finish_reason 'error'."""
        batch, params_list, adapter_list = request_batch(prompts, params, adapters)
        num = len(batch)
        ids = [self.add_request(p, sp, a) for p, sp, a in zip(batch, params_list, adapter_list, strict=True)]
        wanted, final = set(ids), dict[str, RequestOutput]()
        while len(final) < num:
            outputs = self.step()
            final |= {o.request_id: o for o in outputs if o.finished and o.request_id in wanted}
            if not outputs and self.scheduler.num_running == 0:
                time.sleep(0.001)   # only waiting on adapter loads
        return [final[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, adapter_id: str | None = None,
               request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """async for out in engine.stream(...): one RequestOutput per step with new tokens (new_text /
        new_token_ids hold the delta). Raises the request's error (e.g. AdapterNotFound); leaving the loop
        early aborts the request. Steps run on a worker thread driven by the caller's event loop."""
        return self._streams.stream(prompt, params, adapter_id, request_id)

    @torch.inference_mode()
    def score(self, prompt: Prompt, adapter_id: str | None = None, timeout_s: float = 60.0) -> torch.Tensor:
        """Logits [n, V] float32 at every prompt position (one prefill; for evaluation and parity checks)."""
        prompt_ids = self._prompt_ids(prompt)
        seq = Sequence(self.new_request_id(), prompt_ids, SamplingParams(max_tokens=1), adapter_id, time.monotonic())
        with self._step_lock:
            if adapter_id is not None:
                self.adapters.watch(adapter_id)
            try:
                deadline = time.monotonic() + timeout_s
                while adapter_id is not None and self.adapters.adapter_status(adapter_id) == "loading":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"adapter '{adapter_id}' did not load in {timeout_s}s")
                    time.sleep(0.001)
                if adapter_id is not None:
                    if self.adapters.adapter_status(adapter_id) == "failed":
                        raise self.adapters.adapter_error(adapter_id)
                    seq.adapter_slot = self.adapters.try_acquire(adapter_id)
                    if seq.adapter_slot is None:
                        raise Overloaded("no adapter slot is free for scoring")
                blocks = self.scheduler.blocks
                if not blocks.can_allocate(seq, seq.num_tokens):
                    raise Overloaded("not enough free KV blocks to score this prompt now")
                blocks.allocate(seq, seq.num_tokens)
                inputs = self.runner.prepare([ScheduledSeq(seq, seq.num_tokens)], all_logits=True)
                return self.runner.run(inputs)
            finally:
                self.scheduler.blocks.free(seq)
                if seq.adapter_slot is not None:
                    self.adapters.release(adapter_id, seq.adapter_slot)  # type: ignore[arg-type]
                if adapter_id is not None:
                    self.adapters.unwatch(adapter_id)

    def stats(self) -> dict:
        blocks = self.scheduler.blocks
        return {
            "num_waiting": self.scheduler.num_waiting, "num_running": self.scheduler.num_running,
            "num_preemptions": self.scheduler.num_preemptions, "num_steps": self.num_steps,
            "kv_blocks_used": blocks.num_used_blocks, "kv_blocks_total": blocks.num_blocks,
            "adapters": self.adapters.info(),
        }

    def close(self) -> None:
        """Stop the adapter loader threads (requests in flight are not finished)."""
        self.adapters.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        return prompt_token_ids(self.tokenizer, self.model_config.vocab_size, prompt)

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        with self._inbox_lock:
            items, self._inbox = list(self._inbox), deque()
        for kind, item in items:
            if kind == "add":
                self.scheduler.add(item)
            elif kind == "fail":
                failed, failed.error = item
                failed.finish_reason = "error"
                outputs.append(self._finalize(failed, watched=False))
            elif (aborted := self.scheduler.abort(item)) is not None:
                outputs.append(self._finalize(aborted))
        return outputs

    def _run(self, scheduled: list[ScheduledSeq], outputs: list[RequestOutput]) -> None:
        inputs = self.runner.prepare(scheduled)
        logits = self.runner.run(inputs)
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        if not inputs.sampling:
            return
        seqs = [item.seq for item in inputs.sampling]
        result = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs])  # type: ignore[misc]
        now = time.monotonic()
        for seq, token, logprobs in zip(seqs, result.token_ids, result.logprobs, strict=True):
            reason = self._append(seq, token, logprobs, now)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                outputs.append(self._finalize(seq))
            else:
                outputs.append(self._output(seq))

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None, now: float) -> str | None:
        """Add a sampled token; the finish reason if the request is now done."""
        params = seq.params
        seq.append_token(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        detok = seq.detok
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            detok.flush()  # type: ignore[union-attr]
            return "stop"
        delta = detok.add(token)  # type: ignore[union-attr]
        if params.stop and delta:
            index = find_stop(detok.text, params.stop, len(delta))  # type: ignore[union-attr]
            if index is not None:
                detok.text = detok.text[:index]  # type: ignore[union-attr]
                return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            detok.flush()  # type: ignore[union-attr]
            return "length"
        return None

    def _finalize(self, seq: Sequence, watched: bool = True) -> RequestOutput:
        seq.finish_time = time.monotonic()
        if watched and seq.adapter_id is not None:
            self.adapters.unwatch(seq.adapter_id)
        with self._inbox_lock:
            self._unfinished_ids.discard(seq.request_id)
        return self._output(seq, finished=True)

    def _output(self, seq: Sequence, finished: bool = False) -> RequestOutput:
        text = seq.detok.text  # type: ignore[union-attr]
        # Hold back what could be the start of a stop string until the next token decides it.
        hold = 0 if finished else max(0, seq.params.max_stop_len - 1)
        visible = max(seq.num_emitted_chars, len(text) - hold)
        new_tokens = seq.output_token_ids[seq.num_emitted_tokens:]
        new_text = text[seq.num_emitted_chars:visible]
        seq.num_emitted_tokens, seq.num_emitted_chars = seq.num_output_tokens, visible
        return RequestOutput(
            request_id=seq.request_id, adapter_id=seq.adapter_id, prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids), text=text[:visible], new_token_ids=new_tokens, new_text=new_text,
            finished=finished, finish_reason=seq.finish_reason if finished else None, error=seq.error,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            metrics=RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time, seq.num_preemptions),
        )
