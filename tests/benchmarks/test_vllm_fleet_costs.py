"""benchmarks/vllm_fleet_costs.py's fleet model: the rank-class share balances the two replicas' loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import vllm_fleet_costs  # noqa: E402  (its import takes benchmarks/ off sys.path again)


def test_equal_costs_gain_nothing_and_split_the_load_evenly():
    model = vllm_fleet_costs.fleet_model(0.1, 0.1, 0.1, low_fraction=5 / 6)
    assert model["ratio"] == pytest.approx(1.0)
    assert model["classes_req_per_s"] == pytest.approx(20.0)
    # half of all requests on each replica: the class-64 one has the high sixth plus a third from the low ranks
    assert model["low_share_on_class_replica"] == pytest.approx(0.5 / (5 / 6))


def test_cheap_low_class_balances_both_replicas():
    costs = {"low@16": 0.04, "low@64": 0.18, "high@64": 0.18}
    model = vllm_fleet_costs.fleet_model(costs["low@16"], costs["low@64"], costs["high@64"], low_fraction=5 / 6)
    share, rate = model["low_share_on_class_replica"], model["classes_req_per_s"]
    busy0 = rate * (5 / 6) * share * costs["low@16"]
    busy1 = rate * ((1 / 6) * costs["high@64"] + (5 / 6) * (1 - share) * costs["low@64"])
    assert 0.9 < share < 1.0
    assert busy0 == pytest.approx(1.0) and busy1 == pytest.approx(1.0)
    assert model["plain_req_per_s"] == pytest.approx(2 / 0.18)
    assert model["ratio"] == pytest.approx(rate * 0.18 / 2)


def test_when_the_high_ranks_alone_fill_their_replica_no_low_rank_goes_there():
    model = vllm_fleet_costs.fleet_model(0.01, 0.2, 1.0, low_fraction=0.5)
    assert model["low_share_on_class_replica"] == 1.0
    assert model["classes_req_per_s"] == pytest.approx(1 / (0.5 * 1.0))
