"""The vLLM replica: a VllmEngine behind ReplicaServer (the same contract, queue bound, demand counters, heartbeats
and placement sync as the LoRAFleet replica) and its Ray Serve deployment (`engine: vllm`).

vLLM pads every adapter to `max_lora_rank`, so a replica runs with its rank class: the largest adapter rank the
published table placed on its rank (`meta.replica_max_rank`), rounded up to a value vLLM accepts; without a table,
or with nothing placed there, `max_rank`'s. When a new table changes the class, the replica's health check fails
with the reason: Serve stops it gracefully (requests in flight finish) and starts a replacement, which reads the
new class. vllm is imported when the engine is built, so this module imports without it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray import serve

from lorafleet.replicas.deployment import ReplicaDeployment, ReplicaServer
from lorafleet.replicas.vllm_engine import VllmConfig, VllmEngine, lora_rank_class

logger = logging.getLogger("lorafleet.replica")


class RankClass:
    """A rank's wanted max_lora_rank, from the published routing table in Redis (read as JSON: replicas do not
    import placement)."""

    def __init__(self, client: Any, prefix: str, max_rank: int, fixed: int | None = None) -> None:
        self.redis, self.table_key, self.max_rank, self.fixed = client, f"{prefix}:routing_table", max_rank, fixed

    def wanted(self, rank: int | None) -> int:
        """vLLM's max_lora_rank for this rank: `fixed`'s, else its class in the table, else max_rank's (Redis
        errors raise)."""
        if self.fixed is not None:
            return lora_rank_class(self.fixed)
        placed = 0
        raw = self.redis.get(self.table_key) if rank is not None else None
        if raw is not None:
            classes = (json.loads(raw).get("meta") or {}).get("replica_max_rank") or []
            if rank < len(classes) and isinstance(classes[rank], int):
                placed = classes[rank]
        return lora_rank_class(min(placed, self.max_rank) or self.max_rank)


def profile_rank_classes(model_dir: str, spec: Any, config: VllmConfig, num_cpus: float = 1.0) -> dict:
    """Operating points of vLLM replicas per rank class (replicas/profiler.py's document): vLLM pads to
    max_lora_rank, so class r is measured on an engine whose max_lora_rank is r's, as a replica of that class runs.
    One engine at a time; for `lorafleet profile`-style files (operating_points) of a vLLM deployment."""
    from dataclasses import replace

    from lorafleet.replicas.profiler import profile_engine

    docs = []
    for rank in spec.ranks:
        engine_config = replace(config, max_lora_rank=lora_rank_class(rank), max_num_seqs=spec.max_batch,
                                max_batched_tokens=max(config.max_batched_tokens, spec.max_batch))
        with VllmEngine(model_dir, engine_config, num_cpus=num_cpus) as engine:
            docs.append(profile_engine(engine, replace(spec, ranks=(rank,))))
    per_rank = max(d["memory"]["adapter_bytes_per_rank"] for d in docs)
    return {**docs[0], "source": f"vLLM engine profile of {model_dir} (max_lora_rank = the rank class)",
            "points": [p for d in docs for p in d["points"]],
            "probes": {k: v for d in docs for k, v in d["probes"].items()},
            "memory": {**docs[0]["memory"], "adapter_bytes_per_rank": per_rank},
            "is_slo_met": all(d["is_slo_met"] for d in docs)}


class VllmReplicaServer(ReplicaServer):
    """ReplicaServer over a VllmEngine; `sync_placement` also follows the rank class (see the module docstring)."""

    adapter_types = ("LORA",)   # vLLM runs neither FLoRA nor IA3

    def __init__(self, engine: VllmEngine, *, rank_class: RankClass | None = None, **parts: Any) -> None:
        super().__init__(engine, **parts)
        self.rank_class = rank_class
        self.restart_reason: str | None = None

    @classmethod
    def parts_from_settings(cls, settings: Any, rank: int | None = None) -> dict[str, Any]:
        """Constructor arguments: a VllmEngine at `rank`'s class over the store, demand counters, heartbeats and
        the assignment reader in the store's Redis."""
        from lorafleet.infra.assignments import AssignmentReader
        from lorafleet.infra.capacity_store import CapacityStore
        from lorafleet.infra.demand import DemandBuffer, DemandCounters
        from lorafleet.infra.heartbeats import ReplicaLiveness
        from lorafleet.infra.store import AdapterStore
        from lorafleet.infra.store_source import StoreSource

        store = AdapterStore.from_settings(settings, base=settings.model_dir)
        rank_class = RankClass(store.redis, settings.redis_prefix, settings.max_rank, settings.vllm_max_lora_rank)
        source = StoreSource(store)
        config = VllmConfig.from_settings(settings, rank_class.wanted(rank))
        engine = VllmEngine(settings.model_dir, config, source, num_cpus=settings.replica_num_cpus)
        return {"engine": engine, "demand": DemandBuffer(DemandCounters(store.redis, settings.redis_prefix)),
                "liveness": ReplicaLiveness(store.redis, settings.redis_prefix),
                "assignments": AssignmentReader(store.redis, settings.redis_prefix),
                "capacities": CapacityStore(store.redis, settings.redis_prefix), "owned": (engine, source),
                "max_queued_requests": settings.replica_max_queued_requests, "rank_class": rank_class}

    def profile_capacity(self, settings: Any) -> dict:
        """Operating points as the LoRAFleet replica measures them, once per deployment: a replacement started at a
        lower class (vLLM pads to it) keeps what the first start published rather than measure fewer classes."""
        from lorafleet.infra.capacity_store import CapacityStore

        current = CapacityStore(self.liveness.redis, settings.redis_prefix).get()
        if current is not None and self.engine.config.max_lora_rank < lora_rank_class(settings.max_rank):
            return current
        return super().profile_capacity(settings)

    def sync_placement(self) -> bool:
        is_new = super().sync_placement()
        if is_new and self.rank_class is not None and self.restart_reason is None:
            wanted, running = self.rank_class.wanted(self.rank), self.engine.config.max_lora_rank
            if wanted != running:
                self.restart_reason = (f"the routing table moved replica {self.rank} to rank class {wanted}: "
                                       f"restarting vLLM with max_lora_rank={wanted} (was {running})")
                logger.warning(self.restart_reason)
        return is_new

    def health(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"vLLM engine failed: {self.engine.error}")
        if self.restart_reason is not None:
            raise RuntimeError(self.restart_reason)

    def _queue_len(self) -> int:
        return self.engine.num_queued()


_ReplicaActor = ReplicaDeployment.func_or_class


# The LoRAFleet replica's actor (heartbeats, placement sync loop, stream, routing stats, health check) over
# VllmReplicaServer: its __init__ comes first in the method order and builds the parts below.
@serve.deployment(name="replica", max_ongoing_requests=64, health_check_period_s=5)
class VllmReplicaDeployment(_ReplicaActor, VllmReplicaServer):
    """VllmReplicaServer on Ray Serve, built from Settings fields at its rank's class."""

    @classmethod
    def parts_from_settings(cls, settings: Any, rank: int | None = None) -> dict[str, Any]:
        rank = serve.get_replica_context().rank.rank if rank is None else rank
        return VllmReplicaServer.parts_from_settings.__func__(cls, settings, rank)
