"""One rebalance period (LoRAServe Algorithm 1 end to end): demand from Redis → solve → diff → publish."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lorafleet.infra.capacity_store import CapacityStore
from lorafleet.infra.demand import DemandCounters
from lorafleet.infra.errors import InvalidPlacement
from lorafleet.infra.heartbeats import ReplicaLiveness
from lorafleet.placement.demand_estimator import DemandEstimator
from lorafleet.placement.liveness import compact_previous, expand_placement
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.solver import AdapterLoad, solve
from lorafleet.placement.table_diff import TableDiff, diff
from lorafleet.placement.table_store import RoutingTableStore

# adapter_id -> (max rank, bytes); e.g. read from the adapter registry.
AdapterInfo = Callable[[], dict[str, tuple[int, int]]]
# () -> (operating points, the file they came from); read at every run.
PointsSource = Callable[[], tuple[OperatingPoints, str]]


def deployment_points(settings: Any, client: Any) -> PointsSource:
    """The capacities a deployment places with: its `operating_points` file when set (an operator's `lorafleet
    profile`), else what its replicas measured on their own engine at first start (CapacityStore in Redis). The
    packaged 7B file is the simulator's, never a served app's."""
    if settings.operating_points:
        path = str(settings.operating_points)
        return lambda: (OperatingPoints.load(path), path)
    store = CapacityStore(client, settings.redis_prefix)

    def measured() -> tuple[OperatingPoints, str]:
        doc = store.get()
        if doc is None:
            raise InvalidPlacement("no operating points yet: the replicas measure them on first start (or set "
                                   "operating_points to a file written by `lorafleet profile`)")
        return OperatingPoints.from_dict(doc["points"], where=str(doc.get("file"))), str(doc.get("file"))

    return measured


def adapter_info_from(list_current: Callable[[], list]) -> AdapterInfo:
    """AdapterInfo over a `list_current()` of version records (re-read at each call)."""

    def info() -> dict[str, tuple[int, int]]:
        return {r.adapter_id: (r.max_rank, r.num_bytes) for r in list_current()}

    return info


@dataclass(slots=True)
class Rebalancer:
    """Reads demand counters and the current table from Redis, solves, and publishes (compare-and-set).

    Used by `lorafleet rebalance` and by the placement controller every period, both built by from_settings().
    """

    redis: Any
    prefix: str
    points: OperatingPoints | PointsSource   # fixed points, or where to read them at every run
    period_s: float
    max_rank: int
    adapter_info: AdapterInfo | None = None
    num_periods: int = 10
    liveness: ReplicaLiveness | None = None  # heartbeats: run() without live_ranks solves over the live ones
    # adapters the replicas cannot run (vLLM: FLoRA, IA3): never placed, not even with demand counted earlier
    excluded: Callable[[], set[str]] | None = None

    @classmethod
    def from_settings(cls, settings: Any, *, points: OperatingPoints | PointsSource | None = None,
                      num_periods: int = 10) -> Rebalancer:
        """The rebalancer of a deployment: Redis and the adapters' ranks and sizes through its AdapterStore (whose
        reads rebuild a registry Redis lost from the object store), live ranks from the replicas' heartbeats."""
        from lorafleet.infra.store import AdapterStore  # torch-free callers of placement never pay for it

        store = AdapterStore.from_settings(settings)
        # vLLM replicas run LoRA adapters only: FLoRA and IA3 ones answer 400 there, and are never placed.
        is_vllm = getattr(settings, "engine", "lorafleet") == "vllm"
        list_current = (store.list_current if not is_vllm
                        else lambda: [r for r in store.list_current() if r.peft_type == "LORA"])
        excluded = (lambda: {r.adapter_id for r in store.list_current() if r.peft_type != "LORA"}) if is_vllm else None
        return cls(store.redis, settings.redis_prefix, points or deployment_points(settings, store.redis),
                   settings.rebalance_period_s, settings.max_rank, adapter_info_from(list_current),
                   num_periods, ReplicaLiveness(store.redis, settings.redis_prefix), excluded)

    def __post_init__(self) -> None:
        if self.num_periods < 1 or self.period_s <= 0:
            raise InvalidPlacement(
                f"num_periods must be >= 1 and period_s > 0, got {self.num_periods}, {self.period_s}"
            )

    def run(self, num_replicas: int, *, dry_run: bool = False, seed: int = 0, max_moves: int = 20,
            live_ranks: list[int] | None = None) -> tuple[dict, TableDiff]:
        """Solve for `num_replicas`; publish unless dry_run. Returns (report, diff).

        `live_ranks`: solve over those ranks only; None = the ranks the heartbeats call live (with `liveness`),
        else every rank.
        """
        if num_replicas < 1:
            raise InvalidPlacement(f"--num-replicas must be >= 1, got {num_replicas}")
        if live_ranks is None and self.liveness is not None:
            live_ranks = self.liveness.live_ranks(num_replicas)   # a replica that died and stayed dead: left out
        live = sorted(set(live_ranks)) if live_ranks else list(range(num_replicas))
        if live[0] < 0 or live[-1] >= num_replicas:
            raise InvalidPlacement(f"live ranks {live} are not all in 0..{num_replicas - 1}")
        store = RoutingTableStore(self.redis, self.prefix)
        version = store.version()
        previous = store.load()
        counters = DemandCounters(self.redis, self.prefix)
        rates = DemandEstimator().replay(counters, self.period_s, self.num_periods)
        info = store.adapter_info()
        if self.adapter_info is not None:
            info.update(self.adapter_info())
        if self.excluded is not None:
            skip = self.excluded()
            rates = {a: d for a, d in rates.items() if a not in skip}
            info = {a: v for a, v in info.items() if a not in skip}
        unknown = sorted(a for a in rates if a not in info)
        # Unknown rank → the largest allowed: never co-batch a possibly high-rank adapter with low ranks.
        loads = [
            AdapterLoad(a, info.get(a, (self.max_rank, 0))[0], d, info.get(a, (0, 0))[1])
            for a, d in sorted(rates.items())
        ]
        points, points_file = self.points() if callable(self.points) else (self.points, self.points.source)
        if len(live) == num_replicas:
            placement = solve(loads, points, num_replicas, previous=previous, seed=seed)
        else:   # some ranks have no heartbeat: place on the live ones, renumbered, then back on their ranks
            compact = solve(loads, points, len(live), previous=compact_previous(previous, live), seed=seed)
            placement = expand_placement(compact, live, num_replicas)
        change = diff(previous, placement.table, rates)
        solved = replace(placement.table, meta={**placement.table.meta, "operating_points": points_file})
        # Registered adapters without demand route by the table's consistent-hash default (over every rank): that
        # replica is their home, and holds them if its host tier has room after the table's own adapters.
        homes = {a: solved.sample(a) for a in info if a not in solved.entries}
        homes = {a: rank for a, rank in homes.items() if rank in set(live)}
        sizes = {a: size for a, (_, size) in info.items()}
        table = solved if dry_run else store.publish(solved, expected_version=version, homes=homes, sizes=sizes)
        report = {
            "published": not dry_run,
            "version": None if dry_run else table.version,
            "previous_version": version or None,
            "num_replicas": num_replicas,
            "dead_replicas": sorted(set(range(num_replicas)) - set(live)),
            "num_adapters": len(table.entries),
            "num_unknown_rank": len(unknown),
            "operating_points": points_file,
            "class_budgets": {str(c): b for c, b in placement.class_budgets.items()},
            "diff": change.to_dict(max_moves=max_moves),
            "replicas": placement.replica_rows(),
        }
        return report, change
