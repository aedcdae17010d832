"""Exact affinity solver: the placement as a mixed-integer program, solved by HiGHS.

Variables (``T~ = T / cnt``, ``C~ = w * C / min cnt``, see ``raymoe.placement.affinity``):

    x[l, e, r] in {0, 1}      a replica of expert e of layer l sits on rank r
    z[l, i, j, r] in [0, 1]   = x[l, i, r] * x[l+1, j, r]   (all pairs i, j)
    y[l, i, j, r] in [0, 1]   = x[l, i, r] * x[l, j, r]     (i < j; layers with co-activation)

    max  sum T~[l,i,j] z[l,i,j,r] + sum C~[l,i,j] y[l,i,j,r]
    s.t. sum_r x[l,e,r] = logcnt[l,e]                 (replicas on distinct ranks)
         sum_e x[l,e,r] = capacity[l,r]               (exact slot counts)
         sum_e load[l,e] / logcnt[l,e] x[l,e,r] <= max_rank_load[l]       (optional)
         z[l,i,j,r] <= x[l,i,r],  z[l,i,j,r] <= x[l+1,j,r],  y likewise
         sum_j z[l,i,j,r] = capacity[l+1,r] x[l,i,r],  sum_i z[l,i,j,r] = capacity[l,r] x[l+1,j,r]
         sum_{j != i} y[l,{i,j},r] = (capacity[l,r] - 1) x[l,i,r]
             (level-1 RLT: a slot-count row times an x; exact on 0/1 points, and it
             removes the "x = 1/R, everything kept" LP optimum of the plain linearisation)

Rank permutations are symmetries of this model; HiGHS detects and breaks them itself
(its orbitope handling beat a hand-written "expert e on rank <= e" rule in our runs).

The heuristic's solution is passed as a MIP start, so a time-limited solve never returns
less than the heuristic. The result carries HiGHS's dual bound: ``score_bound`` (and
``gap``) is proven, whatever the status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import highspy
import numpy as np

from raymoe.placement.affinity import AffinityProblem, SolveResult, load_lower_bound, score
from raymoe.placement.errors import LoadCapInfeasible, SolverError
from raymoe.placement.highs import new_solver, run


@dataclass
class _Rows:
    """Sparse constraint rows accumulated in COO form."""
    rows: list = field(default_factory=list)
    cols: list = field(default_factory=list)
    vals: list = field(default_factory=list)
    lower: list = field(default_factory=list)
    upper: list = field(default_factory=list)
    count: int = 0

    def add(self, row_of_entry: np.ndarray, cols: np.ndarray, vals: np.ndarray, lower, upper) -> None:
        """Add ``n = len(lower)`` rows; entries name their row 0..n-1 in ``row_of_entry``."""
        lower = np.atleast_1d(np.asarray(lower, dtype=np.float64))
        self.rows.append(np.asarray(row_of_entry) + self.count)
        self.cols.append(np.asarray(cols))
        self.vals.append(np.asarray(vals, dtype=np.float64))
        self.lower.append(lower)
        self.upper.append(np.broadcast_to(np.asarray(upper, dtype=np.float64), lower.shape))
        self.count += len(lower)


@dataclass
class _Model:
    num_x: int
    cost: list = field(default_factory=list)    # objective of the z / y columns
    pairs: list = field(default_factory=list)   # (x_col_a, x_col_b) of every z / y column
    rows: _Rows = field(default_factory=_Rows)


def _x_col(problem: AffinityProblem, layer, expert, rank):
    return (layer * problem.num_experts + expert) * problem.num_ranks + rank


def _assignment_rows(problem: AffinityProblem, model: _Model) -> None:
    """Replica counts, exact slot counts and the optional load cap."""
    num_layers, num_experts, num_ranks = problem.num_layers, problem.num_experts, problem.num_ranks
    cols = np.arange(model.num_x)
    l_idx, e_idx, r_idx = np.unravel_index(cols, (num_layers, num_experts, num_ranks))
    cnt = problem.logcnt.ravel().astype(np.float64)
    model.rows.add(l_idx * num_experts + e_idx, cols, np.ones(len(cols)), cnt, cnt)
    cap = problem.capacity.ravel().astype(np.float64)
    model.rows.add(l_idx * num_ranks + r_idx, cols, np.ones(len(cols)), cap, cap)
    if problem.max_rank_load is not None:
        model.rows.add(l_idx * num_ranks + r_idx, cols, problem.slot_load[l_idx, e_idx],
                       np.full(num_layers * num_ranks, -np.inf), np.repeat(problem.max_rank_load, num_ranks))


def _product_columns(problem: AffinityProblem, model: _Model, weight: np.ndarray, layer_a: int,
                     layer_b: int) -> None:
    """Columns z[i, j, r] = x[layer_a, i, r] * x[layer_b, j, r] for every pair (i, j)
    (i < j when the two layers are the same), with objective ``weight[i, j]``.

    Rows: z <= x_a, z <= x_b, and the level-1 RLT equalities (a capacity row of one
    layer multiplied by an x of the other): sum_j z[i, j, r] = (capacity[layer_b, r]
    - same) * x[layer_a, i, r] and the mirror for j. On 0/1 points they force z to be
    the product exactly; on fractional points they cut off the "everything kept"
    relaxation that makes the plain linearisation useless.
    """
    num_experts, num_ranks = problem.num_experts, problem.num_ranks
    same = layer_a == layer_b
    i, j = np.nonzero(np.triu(np.ones((num_experts, num_experts), dtype=bool), 1) if same
                      else np.ones((num_experts, num_experts), dtype=bool))
    first = model.num_x + sum(len(c) for c in model.cost)
    z = first + np.arange(len(i) * num_ranks)
    pair_i, pair_j = np.repeat(i, num_ranks), np.repeat(j, num_ranks)
    ranks = np.tile(np.arange(num_ranks), len(i))
    x_a, x_b = _x_col(problem, layer_a, pair_i, ranks), _x_col(problem, layer_b, pair_j, ranks)
    n = len(z)
    for x in (x_a, x_b):   # z - x <= 0
        model.rows.add(np.repeat(np.arange(n), 2), np.stack([z, x], 1).ravel(),
                       np.tile([1.0, -1.0], n), np.full(n, -np.inf), 0.0)
    if same:   # pair (i, j), i < j, is in the row of i and the row of j: sum_{j != i} y = (cap - 1) x_i
        _rlt_rows(problem, model, np.concatenate([pair_i, pair_j]), np.concatenate([z, z]),
                  np.concatenate([ranks, ranks]), layer_a, problem.capacity[layer_a] - 1)
    else:
        _rlt_rows(problem, model, pair_i, z, ranks, layer_a, problem.capacity[layer_b])
        _rlt_rows(problem, model, pair_j, z, ranks, layer_b, problem.capacity[layer_a])
    model.cost.append(np.repeat(weight[i, j], num_ranks))
    model.pairs.append((x_a, x_b))


def _rlt_rows(problem: AffinityProblem, model: _Model, experts: np.ndarray, z: np.ndarray, ranks: np.ndarray,
              x_layer: int, mult: np.ndarray) -> None:
    """One row per (expert e, rank r): sum of the z of that row = mult[r] * x[x_layer, e, r].
    experts, z, ranks: [n] row expert, column and rank of every z entry; mult: [R]."""
    num_experts, num_ranks = problem.num_experts, problem.num_ranks
    n_rows = num_experts * num_ranks
    x_cols = _x_col(problem, x_layer, np.arange(num_experts)[:, None], np.arange(num_ranks)[None, :]).ravel()
    coef = -np.broadcast_to(np.asarray(mult, dtype=np.float64)[None, :], (num_experts, num_ranks)).ravel()
    model.rows.add(np.concatenate([experts * num_ranks + ranks, np.arange(n_rows)]), np.concatenate([z, x_cols]),
                   np.concatenate([np.ones(len(z)), coef]), np.zeros(n_rows), 0.0)


def build_model(problem: AffinityProblem) -> tuple[highspy.HighsLp, _Model]:
    """The MILP of the module doc as a HiGHS model."""
    model = _Model(num_x=problem.num_layers * problem.num_experts * problem.num_ranks)
    _assignment_rows(problem, model)
    for layer in range(problem.num_layers - 1):
        _product_columns(problem, model, problem.trans_w[layer], layer, layer + 1)
    for layer in range(problem.num_layers):
        if problem.coact_w[layer].any():
            _product_columns(problem, model, problem.coact_w[layer], layer, layer)
    num_aux = sum(len(c) for c in model.cost)
    n = model.num_x + num_aux
    rows = model.rows
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, rows.count
    lp.col_cost_ = np.concatenate([np.zeros(model.num_x)] + model.cost)
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.ones(n)
    lp.row_lower_, lp.row_upper_ = np.concatenate(rows.lower), np.concatenate(rows.upper)
    r, c, v = (np.concatenate(a) for a in (rows.rows, rows.cols, rows.vals))
    order = np.lexsort((c, r))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.searchsorted(r[order], np.arange(rows.count + 1)).astype(np.int32)
    lp.a_matrix_.index_ = c[order].astype(np.int32)
    lp.a_matrix_.value_ = v[order]
    lp.integrality_ = [highspy.HighsVarType.kInteger] * model.num_x + [highspy.HighsVarType.kContinuous] * num_aux
    lp.sense_ = highspy.ObjSense.kMaximize
    return lp, model


def model_size(problem: AffinityProblem) -> int:
    """Number of MILP columns (x, z and y), to decide whether the exact solver is practical."""
    num_experts = problem.num_experts
    zs = (problem.num_layers - 1) * num_experts * num_experts
    ys = sum(num_experts * (num_experts - 1) // 2 for l in range(problem.num_layers) if problem.coact_w[l].any())
    return (problem.num_layers * num_experts + zs + ys) * problem.num_ranks


def _start_values(model: _Model, presence: np.ndarray) -> np.ndarray:
    x = presence.ravel()
    aux = [np.minimum(x[a], x[b]) for a, b in model.pairs]
    return np.concatenate([x] + aux)


def solve_exact(problem: AffinityProblem, *, time_limit: float = 60.0, mip_rel_gap: float = 1e-6,
                start: np.ndarray | None = None, seed: int = 0) -> SolveResult:
    """Solve the MILP (module doc) within ``time_limit`` seconds.

    start: optional presence [L, E, R] used as a MIP start (e.g. the heuristic's).
    Returns status ``optimal`` (gap <= mip_rel_gap) or ``time_limit`` with the proven
    bound. Raises LoadCapInfeasible when HiGHS proves the cap infeasible.
    """
    t0 = time.perf_counter()
    lp, model = build_model(problem)
    highs = new_solver(time_limit=float(time_limit), mip_rel_gap=float(mip_rel_gap), random_seed=int(seed))
    highs.passModel(lp)
    if start is not None:
        solution = highspy.HighsSolution()
        solution.col_value = _start_values(model, start).tolist()
        solution.value_valid = True
        highs.setSolution(solution)
    status = run(highs, "HiGHS (MILP)")
    info = highs.getInfo()
    if status == highspy.HighsModelStatus.kInfeasible:
        bound = load_lower_bound(problem.loads, problem.logcnt, problem.capacity)
        cap = _cap_ratio(problem)
        raise LoadCapInfeasible(cap, max(bound.imbalance, cap), bound.layer, None, True,
                                "HiGHS proved that no placement with these slot and replica counts reaches the "
                                "cap, so the best max/mean is above it. ")
    values = np.asarray(highs.getSolution().col_value)
    if status not in (highspy.HighsModelStatus.kOptimal, highspy.HighsModelStatus.kTimeLimit) or \
            len(values) < model.num_x or not np.isfinite(info.objective_function_value):
        raise SolverError("HiGHS (MILP)", highs.modelStatusToString(status),
                          f"no integer solution (time limit {time_limit} s); use the heuristic")
    presence = np.round(values[: model.num_x]).reshape(problem.num_layers, problem.num_experts,
                                                       problem.num_ranks)
    name = "optimal" if status == highspy.HighsModelStatus.kOptimal else "time_limit"
    bound = float(info.mip_dual_bound)  # infinite when the limit came before any bound was proven
    return SolveResult(presence, "exact", name, score(problem, presence), bound if np.isfinite(bound) else None,
                       time.perf_counter() - t0)


def _cap_ratio(problem: AffinityProblem) -> float:
    if problem.max_rank_load is None:
        return float("inf")
    return float(problem.max_rank_load[0] * problem.num_ranks / max(problem.loads[0].sum(), 1e-300))
