"""Hierarchical affinity placement: nodes first, then GPUs within each node.

Inter-node links are slower than intra-node ones, so the node-level traffic is
optimised first and never traded for intra-node gains:

# Step 1: place logical experts on nodes (each node = one "rank" holding E / N
#         experts per layer) with the affinity objective, under a node-level load
#         cap 1 + s (cap - 1): a node loaded to the full cap would leave its GPUs no
#         room, so the node cap keeps a share s of the slack (s = 1/2, halved on each
#         retry when a node's GPUs cannot meet the cap).
# Step 2: per node, replicate its hot experts within the node (EPLB's greedy,
#         num_redundant / N slots per node), as DeepSeek EPLB's hierarchical policy does.
# Step 3: per node, place its experts and replicas on its GPUs with the affinity
#         objective restricted to the node's experts (a transition between two nodes is
#         cross-device wherever its ends sit inside their nodes, so the node problems
#         are independent and exact per node).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from raymoe.placement.affinity import AffinityProblem, SolveResult, replica_counts, score, slot_capacity
from raymoe.placement.errors import ConfigError, LoadCapInfeasible

Solver = Callable[[AffinityProblem], SolveResult]


def _node_problem(problem: AffinityProblem, num_nodes: int, slack: float) -> AffinityProblem:
    """Step 1's problem: experts (no replicas) on nodes, node cap keeping ``slack`` of
    the rank-level slack."""
    num_layers, num_experts = problem.loads.shape
    cap = None
    if problem.max_rank_load is not None:
        mean = problem.loads.sum(axis=1) / problem.num_ranks
        ratio = 1.0 + slack * (problem.max_rank_load / np.where(mean > 0, mean, 1.0) - 1.0)
        cap = ratio * problem.loads.sum(axis=1) / num_nodes
    return AffinityProblem(problem.transitions, problem.coactivation, problem.loads,
                           np.ones((num_layers, num_experts), dtype=np.int64),
                           np.tile(slot_capacity(num_experts, num_nodes), (num_layers, 1)), cap,
                           problem.coactivation_weight)


def _gpu_problem(problem: AffinityProblem, members: np.ndarray, redundant: int, gpus: int) -> AffinityProblem:
    """Step 2-3's problem for one node; members: [layers, experts on the node] ids."""
    layers = np.arange(problem.num_layers)
    trans = np.stack([problem.transitions[l][np.ix_(members[l], members[l + 1])] for l in layers[:-1]]) \
        if problem.num_layers > 1 else np.zeros((0, members.shape[1], members.shape[1]))
    coact = np.stack([problem.coactivation[l][np.ix_(members[l], members[l])] for l in layers])
    loads = np.take_along_axis(problem.loads, members, 1)
    logcnt = replica_counts(loads, redundant, gpus)
    capacity = np.tile(slot_capacity(members.shape[1] + redundant, gpus), (problem.num_layers, 1))
    return AffinityProblem(trans, coact, loads, logcnt, capacity, problem.max_rank_load,
                           problem.coactivation_weight)


def _solve_nodes(problem: AffinityProblem, num_nodes: int, num_redundant: int, solve: Solver,
                 slack: float) -> tuple[np.ndarray, list[str]]:
    """Steps 1-3 for one node slack; returns presence [L, E, R] and the solver statuses."""
    num_layers, num_experts = problem.loads.shape
    gpus = problem.num_ranks // num_nodes
    nodes = solve(_node_problem(problem, num_nodes, slack))
    presence = np.zeros((num_layers, num_experts, problem.num_ranks))
    statuses = [nodes.status]
    for node in range(num_nodes):
        members = np.stack([np.flatnonzero(nodes.presence[l, :, node] > 0.5) for l in range(num_layers)])
        sub = solve(_gpu_problem(problem, members, num_redundant // num_nodes, gpus))
        statuses.append(sub.status)
        for layer in range(num_layers):
            presence[layer, members[layer], node * gpus:(node + 1) * gpus] = sub.presence[layer]
    return presence, statuses


def solve_hierarchical(problem: AffinityProblem, num_nodes: int, num_redundant: int,
                       solve: Solver, retries: int = 4) -> SolveResult:
    """Steps 1-3 with ``solve`` (exact or heuristic) at both levels.

    problem: the flat problem (its ``logcnt`` and ``capacity`` are ignored: replicas are
    recomputed per node); requires experts and redundant slots divisible by nodes.
    Returns presence [layers, experts, ranks] scored on the flat objective; no bound.
    """
    start = time.perf_counter()
    num_experts = problem.num_experts
    for name, value in (("num_experts", num_experts), ("num_redundant", num_redundant)):
        if value % num_nodes:
            raise ConfigError(name, value, f"hierarchical placement needs it divisible by {num_nodes} nodes",
                              "use a multiple of the node count, or hierarchical=False")
    slack = 0.5
    for attempt in range(retries):
        try:
            presence, statuses = _solve_nodes(problem, num_nodes, num_redundant, solve, slack)
            break
        except LoadCapInfeasible as exc:
            if attempt == retries - 1:   # a failure under one node split proves nothing globally
                mean = problem.loads.sum(axis=1) / problem.num_ranks
                cap = float((problem.max_rank_load / np.where(mean > 0, mean, 1.0)).max())
                raise LoadCapInfeasible(cap, None, exc.layer, None, False,
                                        f"Hierarchical placement (node cap slack down to {slack:.3f}) failed in a "
                                        f"node sub-problem (numbers relative to that node): "
                                        f"{exc.args[0].split(' Fix:')[0]} Try hierarchical=False (--flat). ") from None
            slack /= 2
    flat = AffinityProblem(problem.transitions, problem.coactivation, problem.loads,
                           presence.sum(axis=2).astype(np.int64), presence.sum(axis=1).astype(np.int64),
                           problem.max_rank_load, problem.coactivation_weight)
    status = next((s for s in statuses if s not in ("optimal", "local_optimum")), statuses[0])
    return SolveResult(presence, "hierarchical", status, score(flat, presence), None,
                       time.perf_counter() - start)
