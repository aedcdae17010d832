"""``build_plan``'s implementation: input checks, one function per policy, objectives.

Policy options (keyword arguments of ``build_plan``):

* ``linear``, ``round_robin``: none; ``num_redundant`` must be 0.
* ``moge``: ``num_groups`` (default ``num_ranks``).
* ``eplb``: ``num_groups`` (DeepSeek's hierarchical policy when it is divisible by
  ``num_nodes``, global otherwise; default None = global), ``refine`` (default False:
  exactly DeepSeek's output; True adds load-lowering swaps).
* ``affinity``: ``solver`` (``auto`` | ``exact`` | ``heuristic``; auto = exact when the
  MILP has at most ``EXACT_MAX_COLUMNS`` columns), ``time_limit`` (s, default 60),
  ``coactivation_weight`` (default 1.0), ``hierarchical`` (default: num_nodes > 1),
  ``restarts`` (heuristic; default 16 on small problems, else 1), ``max_sweeps``,
  ``seed``, ``mip_rel_gap``, ``progress`` (tqdm bar on stderr). The solver's outcome
  (``optimal``, ``time_limit``, ``local_optimum``, ...) is recorded as
  ``params["solver_status"]``; when ``auto``'s exact solve fails, the heuristic's plan is
  kept and ``params["solver_fallback"]`` says why; ``objectives`` holds only floats.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass

import numpy as np

from raymoe.placement.affinity import (AffinityProblem, SolveResult, layout_from_presence, load_lower_bound,
                                make_problem)
from raymoe.placement.baselines import linear_layout, round_robin_layout
from raymoe.placement.errors import ConfigError, LoadCapInfeasible, SolverError
from raymoe.placement.hierarchical import solve_hierarchical
from raymoe.placement.metrics import (coactivation_split_fraction, cross_device_fraction, imbalance_of,
                               inter_node_fraction, rank_loads)
from raymoe.placement.moge import moge_layout
from raymoe.placement.plan import Layout, PlacementPlan
from raymoe.placement.replicate import rebalance_experts, refine_balance
from raymoe.placement.solve_exact import model_size, solve_exact
from raymoe.placement.solve_heuristic import solve_heuristic
from raymoe.placement.trace import RoutingStats, RoutingTrace

EXACT_MAX_COLUMNS = 4000          # solver="auto" picks the MILP up to this many columns
EXACT_HARD_LIMIT = 1_000_000     # solver="exact" refuses larger models (memory)
POLICIES = ("linear", "round_robin", "moge", "eplb", "affinity")


@dataclass(frozen=True, eq=False)
class BuildInputs:
    num_layers: int
    num_experts: int
    num_ranks: int
    num_nodes: int
    loads: np.ndarray | None      # float64 [layers, experts]
    stats: RoutingStats | None
    num_redundant: int
    load_cap: float | None


@dataclass(frozen=True, eq=False)
class PolicyResult:
    layout: Layout
    params: dict       # policy options actually used
    objectives: dict   # solver-specific values (status, gap, ...)


def _positive(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(name, value, "must be a positive integer", f"pass {name} >= 1")
    return int(value)


def _check_inputs(num_layers, num_experts, num_ranks, num_nodes, loads, trace, num_redundant,
                  load_cap) -> BuildInputs:
    num_layers, num_experts = _positive("num_layers", num_layers), _positive("num_experts", num_experts)
    num_ranks, num_nodes = _positive("num_ranks", num_ranks), _positive("num_nodes", num_nodes)
    if num_ranks % num_nodes:
        raise ConfigError("num_nodes", num_nodes, f"does not divide num_ranks = {num_ranks}",
                          "ranks are split evenly over nodes; use a divisor")
    if not isinstance(num_redundant, (int, np.integer)) or num_redundant < 0:
        raise ConfigError("num_redundant", num_redundant, "must be an integer >= 0", "pass 0 or more")
    if num_experts + num_redundant < num_ranks:
        raise ConfigError("num_ranks", num_ranks, f"more ranks than slots ({num_experts} experts + "
                          f"{num_redundant} redundant)", f"use at most {num_experts + num_redundant} ranks "
                          "or add redundant slots")
    stats = trace.stats() if isinstance(trace, RoutingTrace) else trace
    if stats is not None and (stats.num_layers, stats.num_experts) != (num_layers, num_experts):
        raise ConfigError("trace", f"[{stats.num_layers} layers, {stats.num_experts} experts]",
                          f"does not match num_layers = {num_layers}, num_experts = {num_experts}",
                          "pass the statistics of this model")
    if loads is None and stats is not None:
        loads = stats.loads
    if loads is not None:
        loads = RoutingStats.from_arrays(loads, source="loads").loads
        if loads.shape != (num_layers, num_experts):
            raise ConfigError("loads.shape", loads.shape, f"expected {(num_layers, num_experts)}",
                              "pass loads [layers, experts]")
    if load_cap is not None:
        if not np.isfinite(load_cap) or load_cap < 1.0:
            raise LoadCapInfeasible(float(load_cap), 1.0, 0, None, True,
                                    "max/mean is at least 1 for any plan. ")
        if loads is None:
            raise ConfigError("load_cap", load_cap, "a load cap needs expert loads", "pass loads or a trace")
    return BuildInputs(num_layers, num_experts, num_ranks, num_nodes, loads, stats, int(num_redundant),
                       None if load_cap is None else float(load_cap))


def _no_redundant(inp: BuildInputs, policy: str) -> None:
    if inp.num_redundant:
        raise ConfigError("num_redundant", inp.num_redundant, f"policy {policy!r} places no replicas",
                          "use --policy eplb or affinity for redundant slots")


def _linear(inp: BuildInputs) -> PolicyResult:
    _no_redundant(inp, "linear")
    return PolicyResult(linear_layout(inp.num_layers, inp.num_experts, inp.num_ranks), {}, {})


def _round_robin(inp: BuildInputs) -> PolicyResult:
    _no_redundant(inp, "round_robin")
    return PolicyResult(round_robin_layout(inp.num_layers, inp.num_experts, inp.num_ranks), {}, {})


def _moge(inp: BuildInputs, num_groups: int | None = None) -> PolicyResult:
    _no_redundant(inp, "moge")
    groups = inp.num_ranks if num_groups is None else int(num_groups)
    return PolicyResult(moge_layout(inp.num_layers, inp.num_experts, inp.num_ranks, groups),
                        {"num_groups": groups}, {})


def _eplb(inp: BuildInputs, num_groups: int | None = None, refine: bool = False) -> PolicyResult:
    if inp.loads is None:
        raise ConfigError("loads", None, "eplb balances expert loads", "pass loads or a trace")
    slots = inp.num_experts + inp.num_redundant
    result = rebalance_experts(inp.loads, slots, num_groups, inp.num_nodes, inp.num_ranks)
    slot2rank = np.tile(np.arange(slots) // (slots // inp.num_ranks), (inp.num_layers, 1))
    hierarchical = num_groups is not None and num_groups % inp.num_nodes == 0
    phy2log = result.phy2log
    if refine:
        per_domain = inp.num_ranks // inp.num_nodes if hierarchical else None
        phy2log = refine_balance(inp.loads, phy2log, slot2rank, per_domain)
    params = {"num_groups": num_groups, "refine": bool(refine), "hierarchical": hierarchical}
    return PolicyResult(Layout(phy2log, slot2rank), params, {})


def _affinity(inp: BuildInputs, solver: str = "auto", time_limit: float = 60.0,
              coactivation_weight: float = 1.0, hierarchical: bool | None = None, restarts: int | None = None,
              max_sweeps: int = 12, seed: int = 0, mip_rel_gap: float = 1e-6,
              progress: bool = False) -> PolicyResult:
    if inp.stats is None and inp.loads is None:
        raise ConfigError("trace", None, "affinity needs routing statistics", "pass a trace or loads")
    if solver not in ("auto", "exact", "heuristic"):
        raise ConfigError("solver", solver, "unknown solver", "use auto, exact or heuristic")
    stats = inp.stats or RoutingStats.from_arrays(inp.loads)
    problem = make_problem(stats, inp.num_ranks, inp.num_redundant, inp.load_cap, coactivation_weight,
                           loads=inp.loads)
    hierarchical = inp.num_nodes > 1 and (hierarchical is None or bool(hierarchical))
    if restarts is None:
        restarts = 16 if problem.num_layers * problem.num_experts * problem.num_ranks <= 1024 else 1
    chosen = solver
    if solver == "auto":
        chosen = "exact" if model_size(problem) <= EXACT_MAX_COLUMNS else "heuristic"
    elif solver == "exact" and model_size(problem) > EXACT_HARD_LIMIT:
        raise ConfigError("solver", solver, f"the MILP would have {model_size(problem):,} columns "
                          f"(limit {EXACT_HARD_LIMIT:,})", "use solver='heuristic' (or 'auto') for this size")
    fallbacks: list[str] = []  # why `auto` kept the heuristic's plan, one entry per failed exact solve

    def solve(sub: AffinityProblem) -> SolveResult:
        heuristic = solve_heuristic(sub, max_sweeps=max_sweeps, restarts=restarts, time_limit=time_limit,
                                    seed=seed, progress=progress)
        if chosen == "heuristic":
            return heuristic
        try:
            return solve_exact(sub, time_limit=time_limit, mip_rel_gap=mip_rel_gap, start=heuristic.presence,
                               seed=seed)
        except SolverError as error:
            if solver != "auto":
                raise
            fallbacks.append(str(error))
            return heuristic

    if hierarchical:
        result = solve_hierarchical(problem, inp.num_nodes, inp.num_redundant, solve)
    else:
        result = solve(problem)
    params = {"solver": chosen, "time_limit": float(time_limit), "coactivation_weight": float(coactivation_weight),
              "hierarchical": hierarchical, "restarts": int(restarts), "max_sweeps": int(max_sweeps),
              "seed": int(seed), "solver_status": result.status}
    if fallbacks:
        params["solver_fallback"] = "exact solver failed, heuristic plan kept: " + "; ".join(fallbacks)
    objectives = {"affinity_score": result.score}
    if result.score_bound is not None:
        objectives.update(affinity_score_bound=result.score_bound, mip_gap=result.gap)
    return PolicyResult(layout_from_presence(result.presence), params, objectives)


_POLICIES = {"linear": _linear, "round_robin": _round_robin, "moge": _moge, "eplb": _eplb,
             "affinity": _affinity}


def measured_objectives(plan: PlacementPlan, stats: RoutingStats | None, loads: np.ndarray | None) -> dict:
    """The metrics of ``raymoe.placement.metrics`` that the inputs allow, as plain floats."""
    out = {}
    pres = plan.presence
    if stats is not None and stats.transitions is not None and stats.transitions.sum() > 0:
        out["cross_device_fraction"] = cross_device_fraction(pres, stats.transitions)
        if plan.num_nodes > 1:
            out["inter_node_fraction"] = inter_node_fraction(pres, stats.transitions, plan.num_nodes)
    if stats is not None and stats.coactivation is not None and stats.coactivation.sum() > 0:
        out["coactivation_split_fraction"] = coactivation_split_fraction(pres, stats.coactivation)
    if loads is not None:
        imb = imbalance_of(rank_loads(pres, loads))
        out.update(imbalance_mean=float(imb.mean()), imbalance_max=float(imb.max()),
                   balancedness_mean=float((1.0 / imb).mean()))
    return out


def _enforce_cap(plan: PlacementPlan, inp: BuildInputs) -> None:
    """LoadCapInfeasible unless every layer's imbalance is within the cap."""
    if inp.load_cap is None:
        return
    imb = imbalance_of(rank_loads(plan.presence, inp.loads))
    if imb.max() <= inp.load_cap * (1 + 1e-9):
        return
    bound = load_lower_bound(inp.loads, plan.logcnt, plan.slots_per_rank)
    layer = int(np.argmax(imb))
    raise LoadCapInfeasible(inp.load_cap, bound.imbalance, layer, float(imb.max()),
                            inp.load_cap < bound.imbalance,
                            f"Policy {plan.policy!r} does not balance to the cap. ")


def build_plan(policy: str, *, num_layers: int, num_experts: int, num_ranks: int, num_nodes: int = 1,
               loads: np.ndarray | None = None, trace=None, num_redundant: int = 0,
               load_cap: float | None = None, **kwargs) -> PlacementPlan:
    """Build a plan with any policy; the one entry point the CLI and the runtime use.

    policy: ``linear``, ``round_robin``, ``moge``, ``eplb`` or ``affinity``.
    loads: [layers, experts] expert loads (defaults to the trace's loads).
    trace: ``RoutingStats`` (or a ``RoutingTrace``, reduced to its stats).
    num_redundant: extra slots for replicas of hot experts (``eplb``, ``affinity``).
    load_cap: max rank load / mean rank load allowed in every layer; checked for every
        policy (LoadCapInfeasible with the proven bound when it is not met).
    kwargs: policy options (see placement/README.md), e.g. ``solver``, ``time_limit``,
        ``coactivation_weight``, ``hierarchical``, ``num_groups``, ``refine``.
    """
    if policy not in _POLICIES:
        raise ConfigError("policy", policy, "unknown policy", f"use one of {', '.join(POLICIES)}")
    inp = _check_inputs(num_layers, num_experts, num_ranks, num_nodes, loads, trace, num_redundant, load_cap)
    accepted = set(inspect.signature(_POLICIES[policy]).parameters) - {"inp"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError("options", unknown, f"not accepted by policy {policy!r} (it takes "
                          f"{sorted(accepted) or 'no options'})", "see placement/README.md")
    start = time.perf_counter()
    result = _POLICIES[policy](inp, **kwargs)
    elapsed = time.perf_counter() - start
    params = {"num_redundant": inp.num_redundant, "load_cap": inp.load_cap, **result.params}
    plan = PlacementPlan(num_ranks=inp.num_ranks, num_nodes=inp.num_nodes, num_experts=inp.num_experts,
                         phy2log=result.layout.phy2log, slot2rank=result.layout.slot2rank, policy=policy,
                         params=params, objectives={})
    objectives = {**measured_objectives(plan, inp.stats, inp.loads), **result.objectives,
                  "solve_time_s": elapsed}
    plan = dataclasses.replace(plan, objectives=objectives)
    _enforce_cap(plan, inp)
    return plan
