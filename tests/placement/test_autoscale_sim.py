"""Autoscaling over a simulated day (placement/autoscale_sim.py, `lorafleet simulate-autoscaling`): the diurnal
trace is what it says, each policy sizes the fleet by its own signal, the fleet follows the day, and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from lf_testing import in_process_cli

from lorafleet.infra.errors import InvalidPlacement
from lorafleet.placement.autoscale_sim import (
    HIGH_RANKS,
    DiurnalSpec,
    compare_autoscaling,
    day_workloads,
    desired_replicas,
    run_day,
)
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.simulator import SimConfig

SMALL = DiurnalSpec(epochs=8, epoch_requests=400, max_replicas=8, adapters_per_population=30)


def _rate(workload) -> float:
    return workload.num_requests / workload.duration_s


def _high_share(workload) -> float:
    ranks = workload.adapter_ranks[workload.adapter_index]
    return float(np.isin(ranks, HIGH_RANKS).mean())


def test_the_day_swings_rate_and_rank_mix_as_specified():
    days = day_workloads(SMALL, SimConfig(num_replicas=8))
    rates = [_rate(w) for w in days]
    noon, midnight = max(range(8), key=SMALL.phase), min(range(8), key=SMALL.phase)
    expected = SMALL.rate_factor(noon) / SMALL.rate_factor(midnight)
    assert rates[noon] / rates[midnight] == pytest.approx(expected, rel=0.25)
    assert expected > 3.5   # 8 windows sample the 5x cosine near its ends
    assert _high_share(days[midnight]) == pytest.approx(SMALL.high_rank_share(midnight), abs=0.05)
    assert _high_share(days[noon]) == pytest.approx(SMALL.high_rank_share(noon), abs=0.05)
    assert _high_share(days[midnight]) > _high_share(days[noon]) + 0.2


def test_adapter_aware_counts_rank_classes_and_queue_counts_requests_in_flight():
    points = OperatingPoints.default()
    spec = DiurnalSpec(max_replicas=64)
    tokens = 4 * points.capacity(8)
    low = {"capacity_r8": points.capacity(8), "tokens_per_s_r8": tokens, "in_flight": 10.0}
    high = {"capacity_r128": points.capacity(128), "tokens_per_s_r128": tokens, "in_flight": 10.0}
    assert points.capacity(128) < points.capacity(8)
    # the same tokens/s of rank 128 need more replicas than of rank 8; queue length cannot tell them apart
    assert desired_replicas("adapter-aware", 1.0, low, spec) == 4
    assert desired_replicas("adapter-aware", 1.0, high, spec) == int(np.ceil(tokens / points.capacity(128) - 1e-9))
    assert desired_replicas("adapter-aware", 1.0, high, spec) > 4
    assert desired_replicas("queue", 2.0, low, spec) == desired_replicas("queue", 2.0, high, spec) == 5
    assert desired_replicas("queue", 0.01, low, spec) == 64   # clamped to max_replicas
    assert desired_replicas("queue", 1000.0, low, spec) == 1   # and to min_replicas


def test_adapter_aware_fleet_follows_the_day_and_autoscaling_saves_replica_hours():
    config = SimConfig(num_replicas=8)
    days = day_workloads(SMALL, config)
    day = run_day(days, "adapter-aware", 0.7, SMALL, config)
    counts = day["replicas"]
    noon, midnight = max(range(8), key=SMALL.phase), min(range(8), key=SMALL.phase)
    assert counts[0] == 8   # the first window runs at max_replicas (nothing observed yet)
    # decided from the window before: the fleet is larger after the busy noon window than after the quiet night
    assert counts[(noon + 1) % 8] > counts[(midnight + 1) % 8], counts
    fixed = run_day(days, "fixed", 0.0, SMALL, config)
    assert fixed["replicas"] == [8] * 8 and day["replica_hours"] < fixed["replica_hours"]


def test_compare_tunes_each_policy_to_the_slo_and_reports_the_saving():
    out = compare_autoscaling(SMALL, SimConfig(num_replicas=8))
    for name in ("adapter-aware", "queue"):
        best, grid = out["policies"][name], out["policies"][name]["grid"]
        meeting = [g for g in grid if g["meets_slo"]]
        assert meeting, name   # at 80% of max_replicas' capacity the loosest targets must meet the SLO
        assert best["meets_slo"] and best["replica_hours"] == min(g["replica_hours"] for g in meeting)
        assert best["p95_ttft_s"] <= out["slo_p95_ttft_s"]
    aa, queue = out["policies"]["adapter-aware"]["replica_hours"], out["policies"]["queue"]["replica_hours"]
    assert out["saving"] == pytest.approx(1 - aa / queue)


def test_cli_json_and_bad_input(capsys):
    run = in_process_cli(capsys, "simulate-autoscaling")
    code, out, err = run("--epochs", 4, "--epoch-requests", 200, "--max-replicas", 4, "--json")
    assert code == 0, err
    document = json.loads(out)
    assert set(document["policies"]) == {"adapter-aware", "queue"} and len(document["fixed"]["replicas"]) == 4
    for args, fragment in ((("--peak-load", 0), "peak_load"), (("--min-replicas", 9, "--max-replicas", 4),
                                                                 "min_replicas")):
        code, out, err = run(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


def test_the_search_refines_between_the_cheapest_meeting_target_and_the_next():
    from lorafleet.placement.autoscale_sim import REFINE_POINTS, _refined

    coarse = (1.0, 2.0, 4.0, 8.0)
    grid = [{"meets_slo": m, "replica_hours": h} for m, h in ((True, 9.0), (True, 7.0), (False, 5.0), (False, 4.0))]
    refined = _refined(coarse, grid)
    assert len(refined) == REFINE_POINTS and all(2.0 < t < 4.0 for t in refined) and refined == sorted(refined)
    assert _refined(coarse, [g | {"meets_slo": False} for g in grid]) == []   # nothing meets: nothing to refine
    last = [g | {"meets_slo": True} for g in grid]
    assert _refined(coarse, last) == []   # the cheapest meeting target is the grid's last


def test_trend_forecast_extrapolates_the_least_squares_line_damped():
    from lorafleet.placement.autoscaling import trend_forecast

    rising = [(0.0, 10.0), (1.0, 12.0), (2.0, 14.0)]
    assert trend_forecast(rising, 1.0, 1.0) == pytest.approx(16.0)
    assert trend_forecast(rising, 1.0, 0.5) == pytest.approx(15.0)
    assert trend_forecast(rising, 3.0, 0.5) == pytest.approx(17.0)   # further ahead, further along
    assert trend_forecast(rising, 1.0, 0.0) == 14.0                  # damping 0: reactive
    assert trend_forecast([(0.0, 10.0), (1.0, 4.0)], 1.0, 1.0) == 0.0   # falling, never below zero
    assert trend_forecast([(0.0, 10.0), (1.0, 8.0)], 1.0, 0.5) == pytest.approx(7.0)
    assert trend_forecast([(5.0, 3.0), (5.0, 9.0)], 1.0, 1.0) == 9.0   # no spread in time: the last need
    assert trend_forecast([(0.0, 3.0)], 1.0, 1.0) == 3.0 and trend_forecast([], 1.0, 1.0) == 0.0


def test_the_simulated_policies_forecast_one_window_ahead_only_where_asked():
    points = OperatingPoints.default()
    spec = DiurnalSpec(max_replicas=64)   # adapter-aware damping 0.5 (the live default), queue 0 (Serve's)

    def observed(replicas: float) -> dict[str, float]:
        return {"capacity_r8": points.capacity(8), "tokens_per_s_r8": replicas * points.capacity(8),
                "in_flight": 2.0 * replicas}

    aware, queue = [], []
    assert desired_replicas("adapter-aware", 1.0, observed(4), spec, aware) == 4
    assert desired_replicas("adapter-aware", 1.0, observed(8), spec, aware) == 10   # 8 + 0.5 x (8 - 4)
    assert [n for _, n in aware] == pytest.approx([4.0, 8.0])
    assert desired_replicas("queue", 2.0, observed(4), spec, queue) == 4
    assert desired_replicas("queue", 2.0, observed(8), spec, queue) == 8            # reactive, as Serve ships it
    both = replace(spec, queue_trend_damping=1.0)
    queue = []
    desired_replicas("queue", 2.0, observed(4), both, queue)
    assert desired_replicas("queue", 2.0, observed(8), both, queue) == 12
    with pytest.raises(InvalidPlacement, match="trend dampings"):
        DiurnalSpec(trend_damping=1.5)
