"""VllmEngine: vLLM's engine (LoRA on, engine core in this process) behind LoRAFleet's Engine interface.

vLLM's AsyncLLM always runs its core in a child process (ZMQ between the two); its LLMEngine with
VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the core in this one. This class steps that LLMEngine the way LoRAFleet's
Engine is stepped (add_request / abort queue work, `step()` on one thread at a time, StreamHub for async streams),
so ReplicaServer, the profiler and the benchmarks drive either engine. Prompts are tokenized by LoRAFleet's
tokenizer and handed over as token ids, so both engines see the same tokens; vLLM applies stop strings itself.

vllm is imported when an engine is built, never at module import: the replicas package imports without it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.infra.base_spec import TARGET_MODULES
from lorafleet.infra.errors import InvalidRequest, LoRAFleetError
from lorafleet.replicas.outputs import RequestMetrics, RequestOutput
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.replicas.streaming import Prompt, StreamHub, prompt_token_ids, request_batch
from lorafleet.replicas.tokenizer import Tokenizer
from lorafleet.replicas.vllm_adapters import HeldAdapter, VllmAdapters, vllm_target_modules
from lorafleet.replicas.weights import ModelConfig

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vLLM's allowed max_lora_rank values


def lora_rank_class(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    for value in VLLM_LORA_RANKS:
        if value >= rank:
            return value
    raise ValueError(f"rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def vllm_env(num_cpus: float) -> dict[str, str]:
    """Environment of a process that runs a VllmEngine: the core in-process; on CPU, `num_cpus` OpenMP threads,
    unbound (Ray does not pin actors to cores, and vLLM's auto-binding would stack every replica of a node on the
    same ones) and no core reserved for a scheduler process (there is none). The KV budget is passed exactly
    (kv_cache_memory_bytes), not as VLLM_CPU_KVCACHE_SPACE, vLLM's whole-GiB form of it, which would override it."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": str(max(1, int(num_cpus)))}


@dataclass(frozen=True, slots=True)
class VllmConfig:
    """A vLLM replica's limits. max_loras: adapters in one batch, one slot of which the base requests' zero LoRA
    may take; max_cpu_loras: adapters vLLM keeps loaded. target_modules in PEFT names."""

    max_lora_rank: int = 16
    max_loras: int = 4
    max_cpu_loras: int = 16
    target_modules: tuple[str, ...] = tuple(TARGET_MODULES)
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_bytes: int = 256 << 20
    kv_block_size: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    host_cache_max_bytes: int = 1 << 30
    max_adapter_bytes: int = 1 << 30
    adapter_resync_s: float = 30.0
    seed: int = 0
    kernel_backend: str = "vllm"   # names the engine in profile cache keys (replicas/profiler.py)

    def __post_init__(self) -> None:
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, got {self.max_lora_rank}")
        if not 2 <= self.max_loras <= self.max_cpu_loras:
            raise ValueError(f"need 2 <= max_loras <= max_cpu_loras, got {self.max_loras}, {self.max_cpu_loras}")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {list(TARGET_MODULES)}, got {unknown}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def max_rank(self) -> int:
        return self.max_lora_rank

    @property
    def num_pool_rows(self) -> int:   # vLLM pads every slot to max_lora_rank
        return self.max_loras * self.max_lora_rank

    @classmethod
    def from_settings(cls, settings: Any, max_lora_rank: int) -> VllmConfig:
        """From LoRAFleet's Settings: one batch holds min(max_adapters, max_num_seqs) adapters plus the base's zero
        LoRA; vLLM keeps max_adapters loaded (at least that)."""
        max_loras = min(settings.max_adapters, settings.max_num_seqs) + 1
        return cls(max_lora_rank=max_lora_rank, max_loras=max_loras,
                   max_cpu_loras=max(max_loras, settings.max_adapters),
                   target_modules=tuple(settings.vllm_lora_target_modules or TARGET_MODULES),
                   max_num_seqs=settings.max_num_seqs, max_batched_tokens=settings.max_batched_tokens,
                   kv_cache_bytes=settings.kv_cache_bytes, kv_block_size=settings.kv_block_size, dtype=settings.dtype,
                   device=settings.device, host_cache_max_bytes=settings.host_cache_max_bytes,
                   max_adapter_bytes=settings.max_adapter_bytes, adapter_resync_s=settings.adapter_resync_s)


@dataclass(slots=True)
class _Live:
    """A request inside vLLM: what LoRAFleet's RequestOutput reports cumulatively (vLLM sends deltas)."""

    adapter_id: str | None
    prompt_ids: list[int]
    wants_logprobs: bool
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)


class VllmEngine:
    """The Engine interface (add_request / step / abort, generate, stream, load_adapter, stats) over vLLM.

    Thread-safety as Engine: add_request and abort may be called from any thread (queued for the next step);
    step() runs on one thread at a time.
    """

    def __init__(self, model_dir: str | Path, config: VllmConfig | None = None, adapter_source: Any = None,
                 num_cpus: float = 1.0) -> None:
        for key, value in vllm_env(num_cpus).items():
            os.environ.setdefault(key, value)   # before vllm reads its environment
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.config = config = config or VllmConfig()
        self.model_dir = Path(model_dir)
        self.model_config = ModelConfig.from_model_dir(self.model_dir)
        self.tokenizer = Tokenizer.from_model_dir(self.model_dir, self.model_config.eos_token_ids)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.adapters = VllmAdapters(self.model_dir, tempfile.mkdtemp(prefix="lorafleet-vllm-"),
                                     max_lora_rank=config.max_lora_rank, target_modules=config.target_modules,
                                     max_adapter_bytes=config.max_adapter_bytes, source=adapter_source,
                                     resync_s=config.adapter_resync_s)
        args = EngineArgs(
            model=str(self.model_dir), dtype=config.dtype, seed=config.seed, max_model_len=self._max_model_len(),
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_batched_tokens,
            kv_cache_memory_bytes=config.kv_cache_bytes, enforce_eager=True, disable_log_stats=True,
            enable_lora=True, max_lora_rank=config.max_lora_rank, max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras, lora_target_modules=vllm_target_modules(config.target_modules))
        self.llm = LLMEngine.from_engine_args(args)
        self.max_model_len = self.llm.model_config.max_model_len
        self._loras: dict[int, Any] = {}   # int id -> LoRARequest (one object per adapter version)
        self._pending_loras: dict[str, HeldAdapter] = {}   # request id -> its adapter, from stream()
        self._prefetched: list[HeldAdapter] = []   # placement's adapters, loaded into vLLM when it is idle
        self._inbox: deque[tuple[str, Any]] = deque()
        self._inbox_lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._streams = StreamHub(self)
        self.num_steps = 0
        self.error: BaseException | None = None   # a failed step: the engine is unusable (health fails)

    # -- adapters ---------------------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, path: str | Path) -> dict:
        held = self.adapters.load(adapter_id, path)
        return {"adapter_id": adapter_id, "version": held.version, "max_rank": held.rank, "peft_type": "LORA"}

    def unload_adapter(self, adapter_id: str) -> bool:
        return self.adapters.unload(adapter_id)

    def assign_adapters(self, adapter_ids: list[str], sizes: dict[str, int] | None = None) -> int:
        """Placement's adapters for this replica, in priority order: fetched now (blocking: the caller's thread),
        loaded into vLLM when it is idle (install_assigned). Adapters it cannot run are skipped."""
        room = self.config.max_cpu_loras - self.config.max_loras   # never evict what a batch may be using
        held = []
        for adapter_id in adapter_ids[:room]:
            with contextlib.suppress(LoRAFleetError):
                held.append(self.adapters.prepare(adapter_id))
        with self._inbox_lock:
            self._prefetched = held
        return len(held)

    def install_assigned(self) -> int:
        """Load prefetched adapters into vLLM now, if nothing runs (between steps only)."""
        with self._step_lock:
            with self._inbox_lock:
                held, self._prefetched = self._prefetched, []
            if self.llm.has_unfinished_requests() or self._inbox:
                with self._inbox_lock:
                    self._prefetched = held + self._prefetched
                return 0
            for adapter in held:
                self.llm.add_lora(self._lora_request(adapter))
            self.adapters.note_in_engine(set(self.llm.list_loras()))
            return len(held)

    # -- requests ---------------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, adapter_id: str | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Bad prompts raise ValueError here; an adapter that is not held (offline:
        not loaded) fails the request in the next step's output."""
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}")
        request_id = request_id or self.new_request_id()
        adapter = self._pending_loras.pop(request_id, None)
        if adapter is None:
            adapter = self.adapters.base if adapter_id is None else self.adapters.held(adapter_id)
        live = _Live(adapter_id, prompt_ids, params.logprobs is not None, RequestMetrics(time.monotonic()))
        with self._inbox_lock:
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._live[request_id] = live
            self._inbox.append(("add", (request_id, params, adapter)))
        return request_id

    def abort(self, request_id: str) -> None:
        with self._inbox_lock:
            self._inbox.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self._inbox) or self.llm.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Hand queued requests and aborts to vLLM, run one vLLM step; outputs of every request that changed."""
        with self._step_lock:
            outputs = self._drain_inbox()
            if self.llm.has_unfinished_requests():
                try:
                    results = self.llm.step()
                except Exception as exc:   # vLLM's state is unknown now: fail what runs, and health checks
                    self.error = exc
                    return outputs + [self._fail(rid, LoRAFleetError(f"vLLM step failed: {exc}"))
                                      for rid in list(self._live)]
                outputs += [out for r in results if (out := self._output(r)) is not None]
                self.adapters.note_in_engine(set(self.llm.list_loras()))
            self.num_steps += 1
            return outputs

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: str | None | list[str | None] = None) -> list[RequestOutput]:
        """Run prompts to completion (this call drives the engine); outputs in prompt order. Adapters come from
        load_adapter or the adapter source; one that fails comes back with finish_reason 'error'."""
        batch, params_list, adapter_list = request_batch(prompts, params, adapters)
        num = len(batch)
        errors: dict[str, Exception] = {}
        for adapter_id in {a for a in adapter_list if a is not None}:
            try:
                self.adapters.prepare(adapter_id)
            except LoRAFleetError as exc:
                errors[adapter_id] = exc
        ids = [self.add_request(p, sp, a) for p, sp, a in zip(batch, params_list, adapter_list, strict=True)]
        final: dict[str, RequestOutput] = {}
        for rid, adapter_id in zip(ids, adapter_list, strict=True):
            if adapter_id in errors:
                self.abort(rid)
                final[rid] = self._fail(rid, errors[adapter_id])
        while len(final) < num:
            final |= {o.request_id: o for o in self.step() if o.finished and o.request_id not in final}
        return [final[i] for i in ids]

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None, adapter_id: str | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """As Engine.stream; the adapter is fetched and written first, off the event loop."""
        import asyncio

        request_id = request_id or self.new_request_id()
        if adapter_id is not None:
            self._pending_loras[request_id] = await asyncio.to_thread(self.adapters.prepare, adapter_id)
        try:
            async with contextlib.aclosing(self._streams.stream(prompt, params, adapter_id, request_id)) as outs:
                async for out in outs:
                    yield out
        finally:
            self._pending_loras.pop(request_id, None)

    def num_queued(self) -> int:
        """Requests waiting or running in vLLM's scheduler, plus those not handed over yet."""
        scheduler = self.llm.engine_core.engine_core.scheduler
        return len(scheduler.waiting) + len(scheduler.running) + len(self._inbox)

    def stats(self) -> dict:
        scheduler = self.llm.engine_core.engine_core.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        num_blocks = max(1, pool.num_gpu_blocks - 1)   # block 0 is vLLM's null block
        return {"num_waiting": len(scheduler.waiting), "num_running": len(scheduler.running),
                "num_steps": self.num_steps, "kv_blocks_used": num_blocks - pool.get_num_free_blocks(),
                "kv_blocks_total": num_blocks, "adapters": self.adapters.info()}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.engine_core.shutdown()
        self.adapters.close()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------
    def _max_model_len(self) -> int:
        """The configured one, else as LoRAFleet's engine: the model's, capped by what the KV budget holds (vLLM
        refuses to start when one sequence of max_model_len does not fit)."""
        if self.config.max_model_len is not None:
            return self.config.max_model_len
        model, config = self.model_config, self.config
        item = {"float32": 4, "float16": 2, "bfloat16": 2}[config.dtype]
        token_bytes = 2 * model.num_layers * model.num_kv_heads * model.head_dim * item
        # whole blocks of up to 128 tokens (vLLM's CPU block size), less the one vLLM keeps as its null block
        fits = (config.kv_cache_bytes // token_bytes // 128 - 1) * 128
        return max(128, min(model.max_position_embeddings, fits))

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        return prompt_token_ids(self.tokenizer, self.model_config.vocab_size, prompt)

    def _lora_request(self, adapter: HeldAdapter) -> Any:
        from vllm.lora.request import LoRARequest

        lora = self._loras.get(adapter.lora_int_id)
        if lora is None:
            lora = self._loras[adapter.lora_int_id] = LoRARequest(adapter.adapter_id, adapter.lora_int_id,
                                                                  str(adapter.path))
        return lora

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._inbox_lock:
            items, self._inbox = list(self._inbox), deque()
        outputs = []
        for kind, item in items:
            if kind == "abort":
                if item in self._live:
                    self.llm.abort_request([item])
                    outputs.append(self._finish(item, "abort"))
                continue
            request_id, params, adapter = item
            if request_id not in self._live:   # aborted before it reached vLLM
                continue
            if adapter is None:
                outputs.append(self._fail(request_id, LoRAFleetError(
                    f"adapter '{self._live[request_id].adapter_id}' is not loaded")))
                continue
            try:
                self.llm.add_request(request_id, {"prompt_token_ids": self._live[request_id].prompt_ids},
                                     _vllm_params(params), lora_request=self._lora_request(adapter))
            except (ValueError, TypeError) as exc:   # vLLM's own checks of the request
                outputs.append(self._fail(request_id, InvalidRequest(str(exc))))
        return outputs

    def _output(self, result: Any) -> RequestOutput | None:
        live = self._live.get(result.request_id)
        if live is None:
            return None
        completion = result.outputs[0]
        new_ids = list(completion.token_ids)
        now = time.monotonic()
        if new_ids and live.metrics.first_token_time is None:
            live.metrics.first_token_time = now
        live.token_ids += new_ids
        live.text += completion.text
        if live.wants_logprobs and completion.logprobs:
            live.logprobs += [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]
        if result.finished:
            del self._live[result.request_id]
            live.metrics.finish_time = now
        return RequestOutput(result.request_id, live.adapter_id, live.prompt_ids, list(live.token_ids), live.text,
                             new_ids, completion.text, result.finished,
                             completion.finish_reason if result.finished else None,
                             logprobs=list(live.logprobs) if live.wants_logprobs else None, metrics=live.metrics)

    def _finish(self, request_id: str, reason: str, error: Exception | None = None) -> RequestOutput:
        live = self._live.pop(request_id)
        live.metrics.finish_time = time.monotonic()
        return RequestOutput(request_id, live.adapter_id, live.prompt_ids, list(live.token_ids), live.text, [], "",
                             True, reason, error=error, metrics=live.metrics)

    def _fail(self, request_id: str, error: Exception) -> RequestOutput:
        return self._finish(request_id, "error", error)


def _vllm_params(params: SamplingParams) -> Any:
    """vLLM's SamplingParams for LoRAFleet's (logprobs before temperature, as LoRAFleet reports them)."""
    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import RequestOutputKind

    return VllmParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                      top_k=params.top_k, seed=params.seed, stop=list(params.stop) or None,
                      stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
                      logprobs=params.logprobs, skip_special_tokens=params.skip_special_tokens,
                      output_kind=RequestOutputKind.DELTA)
