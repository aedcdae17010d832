"""Fast affinity solver for large instances: layer-wise exact re-assignment + swaps.

Algorithm (all layers, repeated until a sweep gains less than ``sweep_tol`` of the score,
or the time is up):

# Step 1: start from a balanced placement (EPLB's greedy packing per layer, replicas
#         on distinct ranks), repaired to the load cap, then propagate it: each layer
#         in turn takes its best assignment given the layer before (greedy, ExFlow-like).
# Step 2: sweep the layers (forward, then backward, alternating). For layer l, with its
#         neighbours fixed the transition part of the score is linear in l's presence,
#         so the best assignment of l is a transportation problem (experts -> ranks,
#         replicas on distinct ranks, exact slot counts), solved exactly by an LP
#         (HiGHS; the constraint matrix is totally unimodular, so the LP optimum is
#         integral). Co-activation enters linearised around the current placement.
# Step 3: repair the load cap on that candidate by the swaps that remove the most
#         overload per unit of score lost, then run a best-improvement swap search
#         (exact score deltas, co-activation included, cap kept) on both the
#         candidate and the current placement; keep the better one.

The score never decreases across a layer update, so the loop terminates. Nothing is
proven about the optimum: the result reports ``score_bound = None``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import highspy
import numpy as np
from tqdm import tqdm

from raymoe.placement.affinity import (AffinityProblem, SolveResult, inter_gain, layer_score, load_lower_bound,
                                overload, rank_load, score)
from raymoe.placement.errors import LoadCapInfeasible, SolverError
from raymoe.placement.highs import new_solver, run
from raymoe.placement.metrics import imbalance_of
from raymoe.placement.replicate import balanced_packing

_REL_TOL = 1e-9


def _tolerance(problem: AffinityProblem) -> float:
    """Smallest score change that counts as an improvement."""
    return _REL_TOL * (problem.total_transitions + problem.total_coactivation + 1.0)


class _Transport:
    """One layer's assignment LP, built once and re-solved with new costs (warm start).

    Columns x[e, r] in [0, 1] (index e * R + r); rows: sum_r x[e, r] = logcnt[e],
    sum_e x[e, r] = capacity[r].
    """

    def __init__(self, num_experts: int, num_ranks: int):
        self.shape = (num_experts, num_ranks)
        n, m = num_experts * num_ranks, num_experts + num_ranks
        cols = np.arange(n)
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = n, m
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = np.zeros(n), np.zeros(n), np.ones(n)
        lp.row_lower_, lp.row_upper_ = np.zeros(m), np.zeros(m)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.arange(0, 2 * n + 1, 2, dtype=np.int32)
        lp.a_matrix_.index_ = np.stack([cols // num_ranks, num_experts + cols % num_ranks], 1).ravel().astype(np.int32)
        lp.a_matrix_.value_ = np.ones(2 * n)
        lp.sense_ = highspy.ObjSense.kMaximize
        self.highs = new_solver(solver="simplex")
        self.highs.passModel(lp)
        self.cols = cols.astype(np.int32)
        self.rows = np.arange(m, dtype=np.int32)

    def solve(self, gain: np.ndarray, supply: np.ndarray, capacity: np.ndarray) -> np.ndarray:
        """gain: [E, R]; supply: [E]; capacity: [R] -> presence [E, R] 0/1 maximising gain."""
        bounds = np.concatenate([supply, capacity]).astype(np.float64)
        scale = max(float(np.abs(gain).max()), 1e-300)
        self.highs.changeColsCost(len(self.cols), self.cols, (gain / scale).ravel())
        self.highs.changeRowsBounds(len(self.rows), self.rows, bounds, bounds)
        status = run(self.highs, "HiGHS (transport LP)")
        if status != highspy.HighsModelStatus.kOptimal:
            raise SolverError("HiGHS (transport LP)", self.highs.modelStatusToString(status))
        x = np.asarray(self.highs.getSolution().col_value).reshape(self.shape)
        pres = np.round(x)
        assert np.abs(x - pres).max() < 1e-6, "transportation LP vertex must be integral"
        return pres


def _initial(problem: AffinityProblem) -> np.ndarray:
    """[L, E, R]: EPLB-style greedy packing of every layer's replicas (balanced loads)."""
    num_layers, num_experts, num_ranks = problem.num_layers, problem.num_experts, problem.num_ranks
    pres = np.zeros((num_layers, num_experts, num_ranks))
    for layer in range(num_layers):
        labels = np.repeat(np.arange(num_experts), problem.logcnt[layer])
        weight = problem.slot_load[layer][labels]
        packing = balanced_packing(weight[None], num_ranks, labels[None], problem.capacity[layer])
        pres[layer, labels, packing.pack_index[0]] = 1.0
    return pres


def _swap_tables(problem: AffinityProblem, layer: int, pres: np.ndarray, gain: np.ndarray,
                 rows: np.ndarray | None = None) -> "_Swaps":
    """Score delta of swapping slot a (of ``rows``, default all) with any slot b, which
    swaps are forbidden (same rank, or an expert already on the other rank), and the
    loads of both ranks after the swap."""
    experts, ranks = np.nonzero(pres > 0.5)
    rows = np.arange(len(experts)) if rows is None else rows
    coact = problem.coact_w[layer]
    full = gain + coact @ pres                         # [E, R] marginal kept mass
    e_a, r_a = experts[rows], ranks[rows]
    cross_ab = full[e_a][:, ranks]                     # [A, S]: G[e_a, r_b]
    cross_ba = full[experts][:, r_a].T                 # [A, S]: G[e_b, r_a]
    own = full[experts, ranks]
    delta = cross_ab + cross_ba - own[rows][:, None] - own[None, :] - 2.0 * coact[e_a][:, experts]
    forbidden = (pres[e_a][:, ranks] > 0.5) | (pres[experts][:, r_a].T > 0.5)
    load = rank_load(problem, layer, pres)
    w = problem.slot_load[layer][experts]
    moved = w[None, :] - w[rows][:, None]              # rank(a) gains w_b - w_a
    return _Swaps(experts, ranks, rows, delta, forbidden, load,
                  load[r_a][:, None] + moved, load[ranks][None, :] - moved)


@dataclass(frozen=True, eq=False)
class _Swaps:
    experts: np.ndarray    # [S] logical expert of each slot
    ranks: np.ndarray      # [S] rank of each slot
    rows: np.ndarray       # [A] slots a considered
    delta: np.ndarray      # [A, S] score change of swapping a and b
    forbidden: np.ndarray  # [A, S] bool
    load: np.ndarray       # [R] rank loads now
    load_a: np.ndarray     # [A, S] load of rank(a) after the swap
    load_b: np.ndarray     # [A, S] load of rank(b) after the swap

    def apply(self, pres: np.ndarray, flat_index: int) -> None:
        a, b = divmod(flat_index, len(self.experts))
        a = self.rows[a]
        e_a, e_b, r_a, r_b = self.experts[a], self.experts[b], self.ranks[a], self.ranks[b]
        pres[e_a, r_a] = pres[e_b, r_b] = 0.0
        pres[e_a, r_b] = pres[e_b, r_a] = 1.0


def _swap_search(problem: AffinityProblem, layer: int, pres: np.ndarray, gain: np.ndarray,
                 max_iter: int = 5000) -> np.ndarray:
    """Best-improvement slot swaps on one layer, never breaking the load cap."""
    pres = pres.copy()
    tol = _tolerance(problem)
    cap = None if problem.max_rank_load is None else problem.max_rank_load[layer] * (1 + 1e-12)
    for _ in range(max_iter):
        swaps = _swap_tables(problem, layer, pres, gain)
        forbidden = swaps.forbidden
        if cap is not None:
            forbidden = forbidden | (swaps.load_a > cap) | (swaps.load_b > cap)
        delta = np.where(forbidden, -np.inf, swaps.delta)
        best = int(np.argmax(delta))
        if not delta.flat[best] > tol:
            break
        swaps.apply(pres, best)
    return pres


def _repair(problem: AffinityProblem, layer: int, pres: np.ndarray, gain: np.ndarray,
            max_iter: int = 20000) -> np.ndarray | None:
    """Swaps out of the overloaded ranks that cut the overload above the cap at the
    least score lost per unit of overload removed. Returns the repaired presence, or
    None when no swap helps."""
    if problem.max_rank_load is None:
        return pres
    pres = pres.copy()
    cap = problem.max_rank_load[layer]
    eps = 1e-12 * max(cap, 1.0)
    for _ in range(max_iter):
        over = np.maximum(rank_load(problem, layer, pres) - cap, 0.0)
        if over.max() <= eps:
            return pres
        experts, ranks = np.nonzero(pres > 0.5)
        swaps = _swap_tables(problem, layer, pres, gain, rows=np.flatnonzero(over[ranks] > eps))
        change = (np.maximum(swaps.load_a - cap, 0.0) + np.maximum(swaps.load_b - cap, 0.0)
                  - over[ranks[swaps.rows]][:, None] - over[ranks][None, :])
        usable = ~swaps.forbidden & (change < -eps)
        if not usable.any():
            return None
        ratio = np.where(usable, swaps.delta / np.where(usable, -change, 1.0), -np.inf)
        swaps.apply(pres, int(np.argmax(ratio)))
    return None


def _update_layer(problem: AffinityProblem, layer: int, pres: np.ndarray, transport: _Transport) -> np.ndarray:
    """Step 2 and 3 for one layer: returns the better of the LP candidate and the current
    placement, each after repair and swap search. pres: [L, E, R] (not modified)."""
    gain = inter_gain(problem, pres, layer)
    current = _swap_search(problem, layer, pres[layer], gain)
    linear = gain + problem.coact_w[layer] @ pres[layer]
    candidate = transport.solve(linear, problem.logcnt[layer], problem.capacity[layer])
    candidate = _repair(problem, layer, candidate, gain)
    if candidate is None:
        return current
    candidate = _swap_search(problem, layer, candidate, gain)
    if layer_score(problem, layer, candidate, gain) > layer_score(problem, layer, current, gain):
        return candidate
    return current


def _feasible_start(problem: AffinityProblem) -> np.ndarray:
    """Step 1: the balanced start, every layer repaired to the cap (or LoadCapInfeasible)."""
    pres = _initial(problem)
    if problem.max_rank_load is None:
        return pres
    bound = load_lower_bound(problem.loads, problem.logcnt, problem.capacity)
    cap_ratio = float(problem.max_rank_load[bound.layer] * problem.num_ranks / problem.loads[bound.layer].sum())
    if cap_ratio < bound.imbalance - 1e-9:
        raise LoadCapInfeasible(cap_ratio, bound.imbalance, bound.layer, None, True,
                                f"The hottest expert ({bound.expert}) alone carries {bound.share:.4f} x the "
                                "mean rank load per replica. ")
    for layer in range(problem.num_layers):
        repaired = _repair(problem, layer, pres[layer], np.zeros_like(pres[layer]))
        if repaired is None:
            mean = problem.loads[layer].sum() / problem.num_ranks
            found = float(imbalance_of(rank_load(problem, layer, pres[layer]))) if mean > 0 else 1.0
            raise LoadCapInfeasible(float(problem.max_rank_load[layer] / mean), bound.imbalance, layer,
                                    found, False, "The swap repair found no feasible packing. ")
        pres[layer] = repaired
    return pres


def _random_start(problem: AffinityProblem, balanced: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random restart: per layer, pack the replicas by random weights (EPLB's packing,
    so slot counts and distinct ranks hold), then repair to the cap; a layer whose
    repair fails keeps its balanced placement with randomly permuted equal-size ranks.
    balanced: [L, E, R] feasible start."""
    out = np.zeros_like(balanced)
    zero_gain = np.zeros(balanced.shape[1:])
    for layer in range(problem.num_layers):
        labels = np.repeat(np.arange(problem.num_experts), problem.logcnt[layer])
        packing = balanced_packing(rng.random((1, len(labels))), problem.num_ranks, labels[None],
                                   problem.capacity[layer])
        pres = np.zeros_like(zero_gain)
        pres[labels, packing.pack_index[0]] = 1.0
        pres = _repair(problem, layer, pres, zero_gain)
        if pres is None:
            perm = np.arange(problem.num_ranks)
            for size in np.unique(problem.capacity[layer]):
                same = np.flatnonzero(problem.capacity[layer] == size)
                perm[same] = rng.permutation(same)
            pres = balanced[layer][:, perm]
        out[layer] = pres
    return out


def _kick(problem: AffinityProblem, pres: np.ndarray, rng: np.random.Generator, swaps: int = 2) -> np.ndarray:
    """Iterated-local-search perturbation: a few random allowed slot swaps (cap kept) in
    every layer. pres: [L, E, R] -> new array."""
    out = pres.copy()
    zero_gain = np.zeros(pres.shape[1:])
    for layer in range(problem.num_layers):
        for _ in range(swaps):
            table = _swap_tables(problem, layer, out[layer], zero_gain)
            allowed = ~table.forbidden
            if problem.max_rank_load is not None:
                cap = problem.max_rank_load[layer] * (1 + 1e-12)
                allowed &= (table.load_a <= cap) & (table.load_b <= cap)
            choices = np.flatnonzero(allowed)
            if len(choices):
                table.apply(out[layer], int(rng.choice(choices)))
    return out


def _propagate(problem: AffinityProblem, pres: np.ndarray, transport: _Transport, backward: bool) -> np.ndarray:
    """Greedy chain construction (ExFlow-like): each layer, in order, takes the best
    assignment given only the layer placed just before it, repaired to the cap (a layer
    whose repair fails keeps its placement). pres: [L, E, R] -> new array."""
    out = pres.copy()
    layers = range(problem.num_layers - 2, -1, -1) if backward else range(1, problem.num_layers)
    for layer in layers:
        prev = layer + 1 if backward else layer - 1
        if backward:
            gain = problem.trans_w[layer] @ out[prev]
        else:
            gain = problem.trans_w[prev].T @ out[prev]
        placed = transport.solve(gain, problem.logcnt[layer], problem.capacity[layer])
        placed = _repair(problem, layer, placed, gain)
        if placed is not None:
            out[layer] = placed
    return out


def _ascend(problem: AffinityProblem, pres: np.ndarray, transport: _Transport, max_sweeps: int,
            deadline: float | None, bar, sweep_tol: float) -> tuple[np.ndarray, float, str]:
    """Steps 2-3 until a sweep gains less than ``sweep_tol`` x the score. Returns
    (presence, score, status)."""
    current = score(problem, pres)
    tol = _tolerance(problem)
    for sweep in range(max_sweeps):
        order = range(problem.num_layers) if sweep % 2 == 0 else range(problem.num_layers - 1, -1, -1)
        for layer in order:
            pres[layer] = _update_layer(problem, layer, pres, transport)
            bar.update()
        new = score(problem, pres)
        assert new >= current - tol, (new, current)
        bar.set_postfix(score=f"{new:.6g}")
        done, current = new - current <= max(tol, sweep_tol * abs(new)), new
        if done:
            return pres, current, "local_optimum"
        if deadline is not None and time.perf_counter() > deadline:
            return pres, current, "time_limit"
    return pres, current, "sweep_limit"


def solve_heuristic(problem: AffinityProblem, *, max_sweeps: int = 12, restarts: int = 1,
                    time_limit: float | None = None, seed: int = 0, sweep_tol: float = 1e-4,
                    progress: bool = False) -> SolveResult:
    """Solve ``problem`` (see module doc). The first run starts from the balanced
    placement propagated layer by layer (``_propagate``); ``restarts - 1`` extra runs
    start alternately from a perturbation of the best placement so far (``_kick``,
    iterated local search) and from a propagated random placement; the best run wins.
    A run stops when a sweep gains less than ``sweep_tol`` (relative) of its score.
    Returns presence [L, E, R] and its score."""
    start = time.perf_counter()
    deadline = None if time_limit is None else start + time_limit
    balanced = _feasible_start(problem)
    if problem.total_transitions == 0 and problem.total_coactivation == 0:
        return SolveResult(balanced, "heuristic", "balanced_only", 0.0, None, time.perf_counter() - start)
    transport = _Transport(problem.num_experts, problem.num_ranks)
    rng = np.random.default_rng(seed)
    best = None
    with tqdm(total=restarts * max_sweeps * problem.num_layers, desc="affinity heuristic", unit="layer",
              file=sys.stderr, disable=not progress, leave=False) as bar:
        for run in range(restarts):
            if run == 0:
                init = _propagate(problem, balanced, transport, backward=False)
            elif run % 2:
                init = _kick(problem, best[0], rng)
            else:
                init = _propagate(problem, _random_start(problem, balanced, rng), transport, backward=run % 4 == 0)
            pres, value, status = _ascend(problem, init, transport, max_sweeps, deadline, bar, sweep_tol)
            if best is None or value > best[1]:
                best = (pres, value, status)
            if deadline is not None and time.perf_counter() > deadline:
                break
    pres, value, status = best
    assert overload(problem, pres) <= 1e-9 * max(1.0, float(problem.loads.sum()))
    return SolveResult(pres, "heuristic", status, value, None, time.perf_counter() - start)
