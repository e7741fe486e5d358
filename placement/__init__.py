"""lorafleet.placement: demand, operating points, the rank-aware solver, RoutingTable and the simulator."""

from lorafleet.placement.cost_model import StepCostModel
from lorafleet.placement.demand_estimator import CounterSource, DemandEstimator, InMemoryCounters
from lorafleet.placement.operating_points import OperatingPoints
from lorafleet.placement.policies import choose_weighted_p2c
from lorafleet.placement.routing_table import RoutingTable, default_replica
from lorafleet.placement.sim_policies import POLICIES, SimPolicy
from lorafleet.placement.sim_sweep import sweep
from lorafleet.placement.simulator import (
    SimConfig,
    SimResult,
    all_mixed_capacity,
    cluster_capacity,
    compare,
    rate_for_load,
    replicas_needed,
    run_policy,
)
from lorafleet.placement.solver import AdapterLoad, Placement, solve
from lorafleet.placement.table_diff import AdapterMove, TableDiff, diff
from lorafleet.placement.table_store import RoutingTableStore

__all__ = [
    "POLICIES",
    "AdapterLoad",
    "AdapterMove",
    "CounterSource",
    "DemandEstimator",
    "InMemoryCounters",
    "OperatingPoints",
    "Placement",
    "RoutingTable",
    "RoutingTableStore",
    "SimConfig",
    "SimPolicy",
    "SimResult",
    "StepCostModel",
    "TableDiff",
    "all_mixed_capacity",
    "choose_weighted_p2c",
    "cluster_capacity",
    "compare",
    "default_replica",
    "diff",
    "rate_for_load",
    "replicas_needed",
    "run_policy",
    "solve",
    "sweep",
]
