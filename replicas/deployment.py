"""The replica Ray Serve deployment: one Engine behind the typed replica contract (infra/replica_api.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from lorafleet.infra.capacity_store import capacity_by_rank
from lorafleet.infra.demand import DemandBuffer
from lorafleet.infra.errors import InvalidRequest, LoRAFleetError, Overloaded
from lorafleet.infra.replica_api import (
    GenerateRequest,
    RoutingStats,
    ServedBy,
    StreamChunk,
    StreamError,
    StreamItem,
)
from lorafleet.replicas.config import EngineConfig
from lorafleet.replicas.engine import Engine
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.replicas.token_logprobs import TokenLogprobs

TOKENS_PER_S_WINDOW_S = 10.0
ASSIGNMENT_POLL_S = 1.0   # how often a replica looks for a new routing table's assignment
logger = logging.getLogger("lorafleet.replica")


class ReplicaServer:
    """One engine behind Ray Serve (plain class: tests drive it without Ray).

    `generate(request)` yields StreamChunks (the first one carries ServedBy) or one StreamError: errors travel as
    data, by code, so the router raises the same error type.
    """

    adapter_types: tuple[str, ...] = ()   # the PEFT types its engine runs (routing stats); () = every type

    def __init__(self, engine: Engine, *, demand: DemandBuffer | None = None, liveness: Any = None,
                 assignments: Any = None, capacities: Any = None, owned: tuple[Any, ...] = (),
                 max_queued_requests: int | None = None) -> None:
        self.engine = engine
        self.demand = demand or DemandBuffer(None)
        self.liveness = liveness      # heartbeats for placement (ReplicaLiveness), with a store only
        self.assignments = assignments   # the routing table's adapters for this rank (AssignmentReader)
        self.capacities = capacities     # the measured operating points (CapacityStore), for autoscaling stats
        self.assignment_version = 0
        self._owned = owned           # closed with the replica (the adapter source)
        self.rank: int | None = None
        self.capacity: dict[int, float] = {}   # operating points: max tokens/s per rank class (autoscaling)
        self.adapter_memory_bytes = 0
        self._token_times: deque[tuple[float, int]] = deque()
        self._served: deque[tuple[float, int, int, str | None]] = deque()   # (time, rank, tokens, adapter)
        self._num_inflight = 0
        # Bounded queue: max_num_seqs running plus max_queued_requests waiting in the engine; the next request is
        # refused at once (429) rather than queued without bound. None = no bound (Serve's max_ongoing_requests
        # sets the same bound in front of the replica; this holds it without Ray too).
        self.max_inflight = (None if max_queued_requests is None
                             else self.engine.config.max_num_seqs + max_queued_requests)

    @classmethod
    def parts_from_settings(cls, settings: Any) -> dict[str, Any]:
        """Constructor arguments of a store-backed replica: engine (EngineConfig from the same Settings fields),
        the store as its adapter source, demand counters and heartbeats in the store's Redis."""
        from lorafleet.infra.assignments import AssignmentReader
        from lorafleet.infra.capacity_store import CapacityStore
        from lorafleet.infra.demand import DemandCounters
        from lorafleet.infra.heartbeats import ReplicaLiveness
        from lorafleet.infra.store import AdapterStore
        from lorafleet.infra.store_source import StoreSource

        store = AdapterStore.from_settings(settings, base=settings.model_dir)
        source = StoreSource(store)
        engine = Engine.from_pretrained(settings.model_dir, config=EngineConfig.from_settings(settings),
                                        adapter_source=source)
        return {"engine": engine, "demand": DemandBuffer(DemandCounters(store.redis, settings.redis_prefix)),
                "liveness": ReplicaLiveness(store.redis, settings.redis_prefix),
                "assignments": AssignmentReader(store.redis, settings.redis_prefix),
                "capacities": CapacityStore(store.redis, settings.redis_prefix), "owned": (engine, source),
                "max_queued_requests": settings.replica_max_queued_requests}

    def profile_capacity(self, settings: Any) -> dict:
        """Measure this engine's operating points (or reuse a cached measurement) and publish them for placement
        (replicas/profiler.py); probes go up to this replica's max_num_seqs and the settings' SLO."""
        from lorafleet.infra.capacity_store import CapacityStore
        from lorafleet.replicas.profiler import RANK_CLASSES, ProfileSpec, ensure_profile

        ranks = tuple(r for r in RANK_CLASSES if r <= settings.max_rank) or (settings.max_rank,)
        spec = ProfileSpec(ranks, settings.slo_p95_ttft_s, settings.slo_p95_tpot_s,
                           max_batch=self.engine.config.max_num_seqs)
        capacities = CapacityStore(self.liveness.redis, settings.redis_prefix)
        return ensure_profile(self.engine, capacities, settings.profile_dir, spec)

    def sync_placement(self) -> bool:
        """Act on the published table: prefetch this rank's adapters when a new table is out, and install fetched
        ones while the engine is idle (a busy engine installs them at its next step). True on a new table."""
        if self.capacities is not None and not self.capacity:   # the operating points, once measured
            doc = self.capacities.get()
            if doc is not None:
                self.capacity, self.adapter_memory_bytes = capacity_by_rank(doc["points"])
        is_new = False
        if self.assignments is not None and self.rank is not None:
            update = self.assignments.poll(self.rank)
            if update is not None:
                self.assignment_version, items = update
                self.engine.assign_adapters([a for a, _ in items], dict(items))
                is_new = True
        if not self.engine.has_unfinished():
            self.engine.install_assigned()
        return is_new

    def close(self) -> None:
        for part in self._owned:
            part.close()

    @staticmethod
    def _params(request: GenerateRequest) -> SamplingParams:
        return SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                              seed=request.seed, stop=request.stop, logprobs=request.logprobs)

    def _prompt(self, request: GenerateRequest) -> str | list[int]:
        if request.messages is not None:
            return self.engine.tokenizer.apply_chat_template(request.chat, add_generation_prompt=True)
        return request.prompt if isinstance(request.prompt, str) else list(request.prompt or ())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamItem]:
        adapter_id = request.adapter_id
        if self.max_inflight is not None and self._num_inflight >= self.max_inflight:
            yield StreamError.of(Overloaded(
                f"replica {self.rank} is full ({self._num_inflight} requests running or queued, the limit is "
                f"max_num_seqs + replica_max_queued_requests = {self.max_inflight}); retry later"))
            return
        start = time.monotonic()
        state = self.adapter_state(adapter_id)
        first = True
        self._num_inflight += 1
        try:
            params = self._params(request)
            logprobs = TokenLogprobs(self.engine.tokenizer, self.engine.eos_token_ids, params)
            async for out in self.engine.stream(self._prompt(request), params, adapter_id, request.request_id):
                self._count_tokens(len(out.new_token_ids))
                served_by = None
                if first:   # the router's metrics: where the adapter was, and this replica's load
                    info = self.engine.adapters.info()
                    served_by = ServedBy(self.rank, state, time.monotonic() - start, self._queue_len(),
                                         info["num_resident"], info["num_host"])
                    first = False
                yield StreamChunk(
                    text=out.new_text, token_ids=tuple(out.new_token_ids), prompt_tokens=len(out.prompt_token_ids),
                    completion_tokens=len(out.token_ids), finished=out.finished, finish_reason=out.finish_reason,
                    logprobs=logprobs.new_entries(out),
                    served_by=served_by)
                if out.finished:
                    num_tokens = len(out.prompt_token_ids) + len(out.token_ids)
                    self.demand.add(adapter_id, num_tokens)
                    self._record_served(adapter_id, num_tokens)
        except LoRAFleetError as exc:
            yield StreamError.of(exc)
        except ValueError as exc:  # prompt too long, bad sampling values: the request's fault
            yield StreamError.of(InvalidRequest(str(exc)))
        finally:
            self._num_inflight -= 1
            self.demand.flush_if_due()

    def adapter_state(self, adapter_id: str | None) -> str:
        """Where the adapter is now: 'base', 'device' (in the row pools), 'host' (fetched) or 'cold'."""
        if adapter_id is None:
            return "base"
        state = self.engine.adapters.residency(adapter_id)
        return "cold" if state == "loading" else state  # a fetch under way is a cold start

    def _queue_len(self) -> int:
        return self.engine.scheduler.num_waiting + self.engine.scheduler.num_running

    def _count_tokens(self, num_tokens: int) -> None:
        now = time.monotonic()
        self._token_times.append((now, num_tokens))
        while self._token_times and now - self._token_times[0][0] > TOKENS_PER_S_WINDOW_S:
            self._token_times.popleft()

    def _record_served(self, adapter_id: str | None, num_tokens: int) -> None:
        facts = self.engine.adapters.facts(adapter_id) if adapter_id is not None else None
        now = time.monotonic()
        self._served.append((now, facts[0] if facts else 0, num_tokens, adapter_id))
        while self._served and now - self._served[0][0] > TOKENS_PER_S_WINDOW_S:
            self._served.popleft()

    def autoscaling_stats(self) -> dict[str, float]:
        """What the adapter-aware autoscaling policy (cluster/autoscaling.py) sums over replicas: tokens/s served
        per rank class over the last window, the classes' operating points, the bytes of the adapters used in the
        window and the adapter memory one replica has, and the queue."""
        now = time.monotonic()
        recent = [item for item in self._served if now - item[0] <= TOKENS_PER_S_WINDOW_S]
        classes = sorted(self.capacity)
        stats: dict[str, float] = {"queue_len": float(self._queue_len()),
                                   "adapter_memory_bytes": float(self.adapter_memory_bytes)}
        for rank in classes:
            stats[f"capacity_r{rank}"] = self.capacity[rank]
            stats[f"tokens_per_s_r{rank}"] = 0.0
        if classes:
            for _, rank, tokens, _ in recent:   # a rank belongs to the smallest class >= it (base: the smallest)
                klass = next((c for c in classes if c >= rank), classes[-1])
                stats[f"tokens_per_s_r{klass}"] += tokens / TOKENS_PER_S_WINDOW_S
        sizes = {a: (self.engine.adapters.facts(a) or (0, 0))[1] for _, _, _, a in recent if a is not None}
        stats["active_adapter_bytes"] = float(sum(sizes.values()))
        return stats

    def routing_stats(self) -> RoutingStats:
        stats = self.engine.stats()
        now = time.monotonic()
        recent = sum(n for t, n in self._token_times if now - t <= TOKENS_PER_S_WINDOW_S)
        return RoutingStats(
            rank=self.rank, queue_len=self._queue_len(), num_inflight=self._num_inflight,
            resident_adapters=tuple(stats["adapters"]["resident"]), tokens_per_s=recent / TOKENS_PER_S_WINDOW_S,
            kv_used=stats["kv_blocks_used"] / max(1, stats["kv_blocks_total"]),
            max_rank=self.engine.config.max_rank, adapter_types=self.adapter_types,
        )

    def health(self) -> None:
        self.engine.stats()


@serve.deployment(name="replica", max_ongoing_requests=64, health_check_period_s=5)
class ReplicaDeployment(ReplicaServer):
    """ReplicaServer on Ray Serve, built from Settings fields; routing stats name its stable rank."""

    def __init__(self, settings: dict | None = None) -> None:
        from lorafleet.infra.config import load_settings
        from lorafleet.infra.heartbeats import start_heartbeat

        cfg = load_settings(**(settings or {}))
        super().__init__(**self.parts_from_settings(cfg))
        self.rank = serve.get_replica_context().rank.rank
        if cfg.operating_points:   # an operator's file: the capacities, as the controller uses them
            self.capacity, self.adapter_memory_bytes = capacity_by_rank(json.loads(Path(cfg.operating_points)
                                                                                   .read_text()))
        elif self.rank == 0:   # capacities for placement, measured here, once
            self.profile_capacity(cfg)
        # placement solves over the ranks that beat (infra/heartbeats.py)
        self._heartbeat = start_heartbeat(self.liveness, lambda: self.rank,
                                          lambda: {"queue_len": self._queue_len(), "inflight": self._num_inflight})
        threading.Thread(target=self._placement_loop, daemon=True, name="lorafleet-placement-sync").start()

    def _placement_loop(self) -> None:
        is_failing = False
        while not self._heartbeat.wait(ASSIGNMENT_POLL_S):   # the heartbeat's stop event ends both
            try:
                self.sync_placement()
                is_failing = False
            except Exception as exc:   # Redis down: keep what is held, try again next poll
                if not is_failing:
                    logger.warning("placement not synced: %s", exc)
                is_failing = True

    def __del__(self) -> None:
        heartbeat = getattr(self, "_heartbeat", None)
        if heartbeat is not None:
            heartbeat.set()

    def record_routing_stats(self) -> dict:
        return self.routing_stats().to_dict()

    def reconfigure(self, user_config: Any = None, rank: Any = None) -> None:
        """Serve reassigns ranks to keep them contiguous when replicas leave (autoscaling, a lost node): routing
        stats, heartbeats and the table's assignment are all by rank, so follow it."""
        if rank is not None and rank.rank != self.rank:
            logger.info("replica rank %s -> %s", self.rank, rank.rank)
            self.rank = rank.rank
            if self.assignments is not None:
                self.assignments.version = 0   # read the new rank's assignment at the next poll

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.autoscaling_stats()

    def record_replica_metadata(self) -> dict:
        """Static facts Serve hands every router with the replica itself (routing stats arrive only after their
        first period): its rank, so a new router can follow the table from its first request."""
        return {"rank": self.rank}

    def check_health(self) -> None:
        self.health()

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamItem]:
        async for item in self.generate(request):
            yield item
            await asyncio.sleep(0)
