"""Load sweep: P95 TTFT of each policy over a grid of loads and seeds, the largest load that meets the SLO, and the
replicas each policy needs for the SLO at one load (the capacity table of placement/README.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from lorafleet.infra.errors import InvalidPlacement
from lorafleet.placement.sim_policies import POLICIES
from lorafleet.placement.simulator import (
    SimConfig,
    all_mixed_capacity,
    cluster_capacity,
    rate_for_load,
    replicas_needed,
    run_policy,
)
from lorafleet.placement.workload import WorkloadSpec, generate


def parse_loads(text: str) -> tuple[float, ...]:
    """'0.7:0.95:0.025' -> (0.7, 0.725, ..., 0.95) (both ends included), or '0.7,0.8,0.9'."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            count = int(np.floor((stop - start) / step + 1e-9)) + 1
            loads = tuple(round(start + k * step, 6) for k in range(count))
        else:
            loads = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidPlacement(f"--sweep: expected START:STOP:STEP (e.g. 0.7:0.95:0.025) or loads a,b,c, got "
                               f"'{text}'") from None
    if not loads or min(loads) <= 0:
        raise InvalidPlacement(f"--sweep: loads must be > 0, got '{text}'")
    return tuple(sorted(set(loads)))


def max_load_meeting_slo(loads: Sequence[float], meets: Sequence[bool]) -> float | None:
    """The largest load of the grid up to which every load meets the SLO (None: not even the first)."""
    best = None
    for load, ok in zip(loads, meets, strict=True):
        if not ok:
            break
        best = load
    return best


def sweep(spec: WorkloadSpec, policies: Sequence[str], config: SimConfig, loads: Sequence[float],
          seeds: Sequence[int], search_load: float | None = None, search_requests: int = 100_000,
          progress: Callable[[str], None] | None = None) -> dict:
    """Run every policy at every load on the trace of every seed (the workload and the policies' seed).

    Per policy: P95 TTFT / TPOT, SLO met, queue-growth flag per (seed, load); the largest load meeting the SLO
    per seed and its mean; with `search_load`, the fewest replicas meeting the SLO at that load per seed
    (searched on `search_requests` requests) and its mean."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise InvalidPlacement(f"unknown policy '{(unknown or [''])[0]}'; choose from: {', '.join(POLICIES)}")
    say = progress or (lambda _: None)
    out = {name: {"routing": POLICIES[name].routing, "by_seed": {}} for name in policies}
    capacity = {}
    for seed in seeds:
        seed_spec, seed_config = spec.with_(seed=seed), replace(config, seed=seed)
        probe = generate(seed_spec.with_(num_requests=1))   # the seed draws the adapters' ranks
        isolated = cluster_capacity(probe, config.points, config.num_replicas)
        mixed = all_mixed_capacity(probe, config.points, config.num_replicas)
        capacity[str(seed)] = {"rank_isolated_tokens_per_s": isolated, "all_mixed_tokens_per_s": mixed,
                               "all_mixed_load": mixed / isolated}
        rows: dict[str, dict[str, Any]] = {name: {k: [] for k in (
            "p95_ttft_s", "p95_tpot_s", "meets_slo", "is_queue_growing", "backlog_growth")} for name in policies}
        for load in loads:
            rate = rate_for_load(seed_spec, config.points, config.num_replicas, load)
            workload = generate(seed_spec.with_(request_rate=rate))
            for name in policies:
                m = run_policy(workload, name, seed_config).metrics
                for key, values in rows[name].items():
                    values.append(m[key])
                say(f"seed {seed} load {load:.3f} {name}: P95 TTFT {m['p95_ttft_s']:.3f} s"
                    + (" (queues growing)" if m["is_queue_growing"] else ""))
        for name in policies:
            row = rows[name]
            row["max_load_meeting_slo"] = max_load_meeting_slo(loads, row["meets_slo"])
            if search_load is not None:
                rate = rate_for_load(seed_spec, config.points, config.num_replicas, search_load)
                search_spec = seed_spec.with_(request_rate=rate, num_requests=search_requests)
                row["replicas_for_slo"] = replicas_needed(search_spec, name, seed_config)
                say(f"seed {seed} {name}: {row['replicas_for_slo']} replicas for the SLO at load {search_load}")
            out[name]["by_seed"][str(seed)] = row
    for entry in out.values():
        entry["max_load_meeting_slo_mean"] = _mean(r["max_load_meeting_slo"] for r in entry["by_seed"].values())
        if search_load is not None:
            entry["replicas_for_slo_mean"] = _mean(r["replicas_for_slo"] for r in entry["by_seed"].values())
    return {"loads": list(loads), "seeds": list(seeds), "search_load": search_load,
            "search_requests": search_requests, "capacity_by_seed": capacity, "policies": out}


def _mean(values) -> float | None:
    values = list(values)
    return None if not values or any(v is None for v in values) else float(np.mean(values))
