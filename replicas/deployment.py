"""The replica Ray Serve deployment: one Engine, streamed tokens, routing stats, demand counters to Redis."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from lorafleet.infra.errors import LoRAFleetError, Overloaded
from lorafleet.replicas.engine import Engine
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.replicas.token_logprobs import TokenLogprobs

logger = logging.getLogger("lorafleet.replica")
TOKENS_PER_S_WINDOW_S = 10.0
DEMAND_FLUSH_S = 1.0


class DemandBuffer:
    """Per-adapter token/request counts summed in memory and flushed to Redis about once a second.

    The flush runs on a worker thread, one at a time: a slow or blackholed Redis (each call waiting for its
    socket timeout) never stalls the replica's event loop. A Redis outage drops the counts of that period
    (placement is approximate by design); serving never waits.
    """

    def __init__(self, counters: Any | None) -> None:
        self.counters = counters
        self._pending: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._flushing = threading.Event()   # set while a flush thread runs

    def add(self, adapter_id: str | None, num_tokens: int) -> None:
        if adapter_id is None or self.counters is None:
            return
        with self._lock:
            entry = self._pending.setdefault(adapter_id, [0, 0])
            entry[0] += num_tokens
            entry[1] += 1

    def flush_if_due(self, now: float | None = None, *, wait: bool = False) -> None:
        """Start a flush when one is due and none is running; `wait` joins it (tests)."""
        now = time.monotonic() if now is None else now
        if self.counters is None or now - self._last_flush < DEMAND_FLUSH_S or self._flushing.is_set():
            return
        with self._lock:
            pending, self._pending = self._pending, {}
            self._last_flush = now
        if not pending:
            return
        self._flushing.set()
        thread = threading.Thread(target=self._flush, args=(pending,), daemon=True, name="lorafleet-demand")
        thread.start()
        if wait:
            thread.join()

    def _flush(self, pending: dict[str, list[int]]) -> None:
        try:
            for adapter_id, (tokens, requests) in pending.items():
                try:
                    self.counters.record(adapter_id, tokens, requests)
                except LoRAFleetError as exc:
                    logger.warning("demand counters not recorded: %s", exc)
                    return
        finally:
            self._flushing.clear()


class ReplicaServer:
    """One engine behind Ray Serve (plain class: tests drive it without Ray).

    `generate(request)` yields dicts: {"text", "token_ids", "finished", "finish_reason", "prompt_tokens",
    "completion_tokens", "ttft_s", "adapter_state", "logprobs" (TokenLogprobs entries of the new tokens, None
    unless request["logprobs"] = k)} or, for a failed request, {"error": {"status", "code",
    "message"}} — errors travel as data so the router answers with the right HTTP status.
    """

    def __init__(self, model_dir: str, engine_kwargs: dict | None = None, settings: dict | None = None,
                 use_store: bool = True, max_queued_requests: int | None = None) -> None:
        source, counters = None, None
        self.liveness: Any = None   # heartbeats for placement (ReplicaLiveness), with a store only
        if use_store:
            from lorafleet.infra.config import load_settings
            from lorafleet.infra.demand import DemandCounters
            from lorafleet.infra.store import AdapterStore

            cfg = load_settings(**(settings or {}))
            store = AdapterStore.from_settings(cfg, base=model_dir)
            source = store.source()
            counters = DemandCounters(store.redis, cfg.redis_prefix)
            from lorafleet.placement.liveness import ReplicaLiveness

            self.liveness = ReplicaLiveness(store.redis, cfg.redis_prefix)
        self.engine = Engine.from_pretrained(model_dir, adapter_source=source, **(engine_kwargs or {}))
        if source is not None:  # a pushed new version or a removal drops this replica's stale copy
            source.add_listener(lambda event: self.engine.unload_adapter(event.adapter_id))
        self.demand = DemandBuffer(counters)
        self.rank: int | None = None
        self._token_times: deque[tuple[float, int]] = deque()
        self._num_inflight = 0
        # Bounded queue: max_num_seqs running plus max_queued_requests waiting in the engine; the next request is
        # refused at once (429) rather than queued without bound. None = no bound (Serve's max_ongoing_requests
        # sets the same bound in front of the replica; this holds it without Ray too).
        self.max_inflight = (None if max_queued_requests is None
                             else self.engine.config.max_num_seqs + max_queued_requests)

    @staticmethod
    def _params(request: dict) -> SamplingParams:
        return SamplingParams(
            max_tokens=int(request.get("max_tokens") or 16),
            temperature=float(request.get("temperature", 1.0)),
            top_p=float(request.get("top_p", 1.0)),
            seed=request.get("seed"),
            stop=tuple(request.get("stop") or ()),
            logprobs=request.get("logprobs"),
        )

    def _prompt(self, request: dict) -> str | list[int]:
        if "messages" in request:
            return self.engine.tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True)
        return request["prompt"]

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        adapter_id = request.get("adapter_id")
        if self.max_inflight is not None and self._num_inflight >= self.max_inflight:
            message = (f"replica {self.rank} is full ({self._num_inflight} requests running or queued, the limit is "
                       f"max_num_seqs + replica_max_queued_requests = {self.max_inflight}); retry later")
            yield {"error": {"status": Overloaded.http_status, "code": Overloaded.code, "message": message}}
            return
        start = time.monotonic()
        state = self.adapter_state(adapter_id)
        first = True
        self._num_inflight += 1
        try:
            params = self._params(request)
            prompt = self._prompt(request)
            logprobs = TokenLogprobs(self.engine.tokenizer, self.engine.eos_token_ids, params)
            async for out in self.engine.stream(prompt, params, adapter_id, request.get("request_id")):
                self._count_tokens(len(out.new_token_ids))
                item = {
                    "text": out.new_text, "token_ids": out.new_token_ids, "finished": out.finished,
                    "finish_reason": out.finish_reason, "prompt_tokens": len(out.prompt_token_ids),
                    "completion_tokens": len(out.token_ids), "adapter_state": state,
                    "logprobs": logprobs.new_entries(out),
                }
                if first:  # the router's metrics: where the adapter was, and this replica's load
                    item |= {"ttft_s": time.monotonic() - start, "replica_rank": self.rank,
                             **self._residency_counts(), "queue_len": self._queue_len()}
                    first = False
                yield item
                if out.finished:
                    self.demand.add(adapter_id, len(out.prompt_token_ids) + len(out.token_ids))
        except LoRAFleetError as exc:
            yield {"error": {"status": exc.http_status, "code": exc.code, "message": str(exc)}}
        except ValueError as exc:  # prompt too long, bad sampling values: the request's fault
            yield {"error": {"status": 400, "code": "invalid_request", "message": str(exc)}}
        finally:
            self._num_inflight -= 1
            self.demand.flush_if_due()

    def adapter_state(self, adapter_id: str | None) -> str:
        """Where the adapter is now: 'base', 'device' (in the row pools), 'host' (fetched) or 'cold'."""
        if adapter_id is None:
            return "base"
        state = self.engine.adapters.residency(adapter_id)
        return "cold" if state == "loading" else state  # a fetch under way is a cold start

    def _residency_counts(self) -> dict:
        info = self.engine.adapters.info()
        return {"num_device": info["num_resident"], "num_host": info["num_host"]}

    def _queue_len(self) -> int:
        return self.engine.scheduler.num_waiting + self.engine.scheduler.num_running

    def _count_tokens(self, num_tokens: int) -> None:
        now = time.monotonic()
        self._token_times.append((now, num_tokens))
        while self._token_times and now - self._token_times[0][0] > TOKENS_PER_S_WINDOW_S:
            self._token_times.popleft()

    def routing_stats(self) -> dict:
        stats = self.engine.stats()
        now = time.monotonic()
        recent = sum(n for t, n in self._token_times if now - t <= TOKENS_PER_S_WINDOW_S)
        return {
            "rank": self.rank,
            "queue_len": self._queue_len(),
            "num_inflight": self._num_inflight,
            "resident_adapters": stats["adapters"]["resident"],
            "tokens_per_s": recent / TOKENS_PER_S_WINDOW_S,
            "kv_used": stats["kv_blocks_used"] / max(1, stats["kv_blocks_total"]),
        }

    def health(self) -> None:
        self.engine.stats()


@serve.deployment(name="replica", max_ongoing_requests=64, health_check_period_s=5)
class ReplicaDeployment(ReplicaServer):
    """ReplicaServer on Ray Serve: routing stats name this replica's stable rank for the RequestRouter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank = serve.get_replica_context().rank.rank
        if self.liveness is not None:   # placement solves over the ranks that beat (placement/liveness.py)
            from lorafleet.placement.liveness import start_heartbeat

            self._heartbeat = start_heartbeat(self.liveness, lambda: self.rank,
                                              lambda: {"queue_len": self._queue_len(), "inflight": self._num_inflight})

    def __del__(self) -> None:
        heartbeat = getattr(self, "_heartbeat", None)
        if heartbeat is not None:
            heartbeat.set()

    def record_routing_stats(self) -> dict:
        return self.routing_stats()

    def check_health(self) -> None:
        self.health()

    async def stream(self, request: dict) -> AsyncIterator[dict]:
        async for item in self.generate(request):
            yield item
            await asyncio.sleep(0)
