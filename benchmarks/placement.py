"""Placement at scale: solver time (cold and with a previous table), quality, and the routing table's size,
serialisation and Redis publish time, on a Zipf workload of many adapters. `lorafleet bench placement`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.workload import adapter_ids, assign_ranks, zipf_popularity

RANKS = (8, 16, 32, 64, 128)
# Most served LoRA adapters are low rank; with uniform ranks 100k adapters would not fit 1,000 x 8 GiB.
RANK_WEIGHTS = (0.4, 0.3, 0.15, 0.1, 0.05)


@dataclass(frozen=True, slots=True)
class PlacementBenchSpec:
    num_adapters: int = 100_000
    num_replicas: int = 1_000
    adapter_gib: float = 8.0  # adapter memory per replica
    load: float = 0.7  # demand as a fraction of the rank-isolated capacity
    zipf_alpha: float = 1.1
    noise: float = 0.2  # the warm solve sees demand x uniform(1 - noise, 1 + noise)
    repeats: int = 3
    seed: int = 0
    publish: bool = True  # time RoutingTableStore.publish against Redis


PRESETS = {
    "100k": PlacementBenchSpec(),
    # 1M adapters of ~51 MiB on 4,096 replicas need ~12.5 GiB each: 24 GiB of an H200's 141 GB
    "1m": PlacementBenchSpec(num_adapters=1_000_000, num_replicas=4_096, adapter_gib=24.0, repeats=3),
}


def workload(spec: PlacementBenchSpec, points: OperatingPoints) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(adapter ids, ranks int64 [A], demand float64 [A] tokens/s) at `spec.load` of the rank-isolated capacity."""
    rng = np.random.default_rng(spec.seed)
    popularity = zipf_popularity(spec.num_adapters, spec.zipf_alpha)
    ranks = assign_ranks(spec.num_adapters, RANKS, RANK_WEIGHTS, rng)
    caps = np.array([points.capacity(int(r)) for r in RANKS])
    per_replica = sum(popularity[ranks == r].sum() / cap for r, cap in zip(RANKS, caps, strict=True))
    demand = popularity * spec.load * spec.num_replicas / per_replica
    return adapter_ids(spec.num_adapters), ranks.astype(np.int64), demand


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """(median wall seconds, [wall seconds], last output), each call's process CPU seconds in CPU_TIMES."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        began, began_cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    CPU_TIMES[:] = cpu
    return statistics.median(times), times, out


# CPU seconds of the last _median_time: on a shared VM wall time includes waiting for a core, CPU time does not
CPU_TIMES: list[float] = []


def run_placement_bench(spec: PlacementBenchSpec, redis_url: str | None = None) -> dict[str, Any]:
    """Median seconds of each step over `spec.repeats` runs, the placement's quality, the table's size."""
    # The warm solve's assignment imports SciPy on first use (~0.3 s once per process, which a running placement
    # controller has long paid): imported here, outside the timing.
    import scipy.sparse.csgraph  # noqa: F401

    from lorafleet.placement import AdapterLoad, RoutingTable, diff, solve

    points = OperatingPoints.default()
    max_bytes = int(spec.adapter_gib * 2**30)
    ids, ranks, demand = workload(spec, points)
    noisy = demand * np.random.default_rng(spec.seed + 1).uniform(1 - spec.noise, 1 + spec.noise, len(demand))
    loads = [AdapterLoad(a, int(r), float(d)) for a, r, d in zip(ids, ranks.tolist(), demand.tolist(), strict=True)]
    loads_noisy = [AdapterLoad(a, int(r), float(d))
                   for a, r, d in zip(ids, ranks.tolist(), noisy.tolist(), strict=True)]
    rows: dict[str, Any] = {}
    cold_s, cold_all, cold = _median_time(lambda: solve(loads, points, spec.num_replicas,
                                                        max_adapter_bytes=max_bytes), spec.repeats)
    rows["solve_cold"] = _row(cold_s, cold_all)
    warm_s, warm_all, warm = _median_time(lambda: solve(loads_noisy, points, spec.num_replicas, previous=cold.table,
                                                        max_adapter_bytes=max_bytes), spec.repeats)
    rows["solve_warm"] = _row(warm_s, warm_all)
    text_s, text_all, text = _median_time(cold.table.to_json, spec.repeats)
    rows["to_json"] = _row(text_s, text_all)
    parse_s, parse_all, _ = _median_time(lambda: RoutingTable.from_json(text), spec.repeats)
    rows["from_json"] = _row(parse_s, parse_all)
    if spec.publish:
        rows.update(_publish_rows(cold.table, spec.repeats, redis_url))
    change = diff(cold.table, warm.table, {a: float(d) for a, d in zip(ids, noisy, strict=True)})
    num_pieces = sum(len(e) for e in cold.table.entries.values())
    quality = {
        "cold": _quality(cold), "warm": _quality(warm) | {"churn": change.churn, "num_moved": change.num_moved},
    }
    return {
        "spec": asdict(spec), "steps": rows, "quality": quality,
        "table": {"num_entries": len(cold.table), "num_pieces": num_pieces, "json_bytes": len(text),
                  "json_bytes_per_adapter": len(text) / max(len(cold.table), 1)},
    }


def _row(median_s: float, times_s: list[float]) -> dict[str, Any]:
    return {"median_s": median_s, "times_s": times_s, "cpu_median_s": statistics.median(CPU_TIMES),
            "cpu_times_s": list(CPU_TIMES)}


def _quality(placement) -> dict[str, Any]:
    return {"max_utilization": placement.max_utilization, "balanced_utilization": placement.balanced_utilization,
            "target_utilization": placement.target_utilization, "is_overloaded": placement.is_overloaded,
            "num_spilled": placement.num_spilled, "class_budgets": {str(c): b for c, b in
                                                                    placement.class_budgets.items()},
            "max_adapters_per_replica": max(placement.replica_num_adapters)}


def _publish_rows(table, repeats: int, redis_url: str | None) -> dict[str, Any]:
    """RoutingTableStore.publish (JSON + per-replica lists + CAS) and load, under a throwaway key prefix."""
    import uuid

    from lorafleet.infra.config import get_settings
    from lorafleet.infra.redis_conn import connect
    from lorafleet.placement.table_store import RoutingTableStore

    client = connect(redis_url or get_settings().redis_url)
    prefix = f"lorafleet-bench-placement-{uuid.uuid4().hex[:8]}"
    store = RoutingTableStore(client, prefix)
    try:
        publish_s, publish_all, _ = _median_time(lambda: store.publish(table), repeats)
        publish = _row(publish_s, publish_all)
        load_s, load_all, _ = _median_time(store.load, repeats)
        load = _row(load_s, load_all)
        assigned = client.hgetall(store.assigned_key)
        assigned_bytes = sum(len(k) + len(v) for k, v in assigned.items())
    finally:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    return {"publish": publish | {"assigned_bytes": assigned_bytes}, "load": load}


def print_report(result: dict[str, Any]) -> None:
    spec, table = result["spec"], result["table"]
    print(f"placement: {spec['num_adapters']:,} adapters x {spec['num_replicas']:,} replicas, "
          f"{spec['adapter_gib']} GiB adapter memory, load {spec['load']}, median of {spec['repeats']} "
          f"({result.get('date', '')}, {result.get('hardware', {}).get('cpu', '')})")
    print(f"{'step':<12} {'median s':>10} {'CPU s':>8}  all s")
    for name, row in result["steps"].items():
        print(f"{name:<12} {row['median_s']:>10.3f} {row['cpu_median_s']:>8.3f}  "
              f"{', '.join(f'{t:.3f}' for t in row['times_s'])}")
    print(f"table: {table['num_entries']:,} entries, {table['num_pieces']:,} pieces, "
          f"{table['json_bytes'] / 2**20:.1f} MiB JSON ({table['json_bytes_per_adapter']:.0f} B/adapter)")
    for name, q in result["quality"].items():
        extra = f", churn {q['churn']:.3f} ({q['num_moved']:,} moved)" if "churn" in q else ""
        print(f"{name}: max util {q['max_utilization']:.3f}, balanced {q['balanced_utilization']:.3f}, "
              f"target {q['target_utilization']:.3f}, overloaded {q['is_overloaded']}, spilled {q['num_spilled']:,},"
              f" max adapters/replica {q['max_adapters_per_replica']}{extra}")
