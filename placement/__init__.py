"""Expert placement planning: arrays in, plan out (never imports ray, torch.distributed
or grpc). See placement/README.md for the policies, the plan format and the CLI."""

from raymoe.placement.errors import (ConfigError, LoadCapInfeasible, PlacementError, PlanError, SolverError,
                              TraceError)
from raymoe.placement.metrics import PlanScore, StepImbalance, score_plan
from raymoe.placement.build import build_plan
from raymoe.placement.plan import Layout, PlacementPlan
from raymoe.placement.trace import RoutingStats, RoutingTrace, load_stats, load_trace, trace_from_array

__all__ = [
    "ConfigError", "Layout", "LoadCapInfeasible", "PlacementError", "PlacementPlan", "PlanError", "PlanScore",
    "RoutingStats", "RoutingTrace", "SolverError", "StepImbalance", "TraceError", "build_plan", "load_stats",
    "load_trace", "score_plan", "trace_from_array",
]
