"""The affinity objective (ExFlow): keep consecutive layers' experts on one rank.

A placement is a 0/1 ``presence: [layers, experts, ranks]`` (1 where a replica of the
logical expert sits on the rank). Solvers maximise the *kept mass*

    score = sum_l sum_{i,j} T_l[i, j] / cnt_l[i] * |R_l(i) & R_{l+1}(j)|
          + sum_l sum_{i<j} w * C_l[i, j] / min(cnt_l[i], cnt_l[j]) * |R_l(i) & R_l(j)|

(T = transitions, C = co-activation, w = ``coactivation_weight``, cnt = replicas,
R(i) = ranks holding i), which is ``total * (1 - cross-device fraction)`` plus the
weighted kept co-activation of ``raymoe.placement.metrics``. Constraints: exact slot counts
``capacity[l, r]``, ``cnt_l[e]`` replicas on distinct ranks, and optionally every
rank's load <= ``max_rank_load[l]`` (load split evenly over replicas).

The score is linear in one layer's presence when its neighbours are fixed (``gain``),
which the heuristic exploits; the MILP linearises the products.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from raymoe.placement.errors import ConfigError
from raymoe.placement.plan import Layout
from raymoe.placement.replicate import replicate_experts
from raymoe.placement.trace import RoutingStats


@dataclass(frozen=True, eq=False)
class AffinityProblem:
    transitions: np.ndarray       # float64 [layers-1, experts, experts]
    coactivation: np.ndarray      # float64 [layers, experts, experts], symmetric, zero diagonal
    loads: np.ndarray             # float64 [layers, experts]
    logcnt: np.ndarray            # int64 [layers, experts]  replicas per logical expert
    capacity: np.ndarray          # int64 [layers, ranks]    slots per rank
    max_rank_load: np.ndarray | None = None  # float64 [layers] absolute cap on a rank's load
    coactivation_weight: float = 1.0

    @property
    def num_layers(self) -> int:
        return self.loads.shape[0]

    @property
    def num_experts(self) -> int:
        return self.loads.shape[1]

    @property
    def num_ranks(self) -> int:
        return self.capacity.shape[1]

    @cached_property
    def trans_w(self) -> np.ndarray:
        """[layers-1, E, E]: T_l[i, j] / cnt_l[i]."""
        return self.transitions / self.logcnt[:-1, :, None]

    @cached_property
    def coact_w(self) -> np.ndarray:
        """[layers, E, E]: w * C_l[i, j] / min(cnt_l[i], cnt_l[j])."""
        cnt = self.logcnt.astype(np.float64)
        return self.coactivation_weight * self.coactivation / np.minimum(cnt[:, :, None], cnt[:, None, :])

    @cached_property
    def slot_load(self) -> np.ndarray:
        """[layers, E]: load one replica carries."""
        return self.loads / self.logcnt

    @cached_property
    def total_transitions(self) -> float:
        return float(self.transitions.sum())

    @cached_property
    def total_coactivation(self) -> float:
        return float(self.coactivation.sum())


@dataclass(frozen=True, eq=False)
class SolveResult:
    presence: np.ndarray      # float64 [layers, experts, ranks] 0/1
    solver: str               # "exact" or "heuristic" (or a composite name)
    status: str               # "optimal", "time_limit", "local_optimum", ...
    score: float              # kept mass reached (see module doc)
    score_bound: float | None  # proven upper bound on the score (MILP dual bound), else None
    solve_time_s: float

    @property
    def gap(self) -> float | None:
        """Proven relative gap (bound - score) / bound, None without a bound."""
        if self.score_bound is None:
            return None
        return 0.0 if self.score_bound <= 0 else max(0.0, (self.score_bound - self.score) / self.score_bound)


@dataclass(frozen=True)
class LoadBound:
    imbalance: float  # proven lower bound on max rank load / mean rank load
    layer: int        # layer where it is reached
    expert: int       # hottest expert of that layer
    share: float      # that expert's load per replica / mean rank load


def slot_capacity(num_slots: int, num_ranks: int) -> np.ndarray:
    """int64 [ranks]: slots per rank, the first ``num_slots % num_ranks`` ranks get one more."""
    if num_slots < num_ranks:
        raise ConfigError("num_ranks", num_ranks, f"more ranks than the {num_slots} slots",
                          "use fewer ranks or add redundant slots")
    return num_slots // num_ranks + (np.arange(num_ranks) < num_slots % num_ranks).astype(np.int64)


def replica_counts(loads: np.ndarray, num_redundant: int, num_ranks: int) -> np.ndarray:
    """loads: [layers, E] -> logcnt [layers, E], EPLB's greedy (hottest per replica first)."""
    num_experts = loads.shape[1]
    if num_redundant < 0 or num_redundant > num_experts * (num_ranks - 1):
        raise ConfigError("num_redundant", num_redundant, f"must be in [0, {num_experts * (num_ranks - 1)}] "
                          f"({num_experts} experts, {num_ranks} ranks, replicas on distinct ranks)",
                          "use fewer redundant slots")
    return replicate_experts(loads, num_experts + num_redundant, max_replicas=num_ranks).logcnt


def make_problem(stats: RoutingStats, num_ranks: int, num_redundant: int = 0, load_cap: float | None = None,
                 coactivation_weight: float = 1.0, loads: np.ndarray | None = None) -> AffinityProblem:
    """The affinity problem of ``stats`` (loads [layers, E] override ``stats.loads``)."""
    loads = stats.loads if loads is None else np.asarray(loads, dtype=np.float64)
    num_layers, num_experts = loads.shape
    trans = stats.transitions if stats.transitions is not None else np.zeros(
        (num_layers - 1, num_experts, num_experts))
    coact = stats.coactivation if stats.coactivation is not None else np.zeros(
        (num_layers, num_experts, num_experts))
    logcnt = replica_counts(loads, num_redundant, num_ranks)
    cap = np.tile(slot_capacity(num_experts + num_redundant, num_ranks), (num_layers, 1))
    max_load = None if load_cap is None else load_cap * loads.sum(axis=1) / num_ranks
    return AffinityProblem(trans, coact, loads, logcnt, cap, max_load, float(coactivation_weight))


def score(problem: AffinityProblem, presence: np.ndarray) -> float:
    """Kept mass of ``presence: [layers, E, R]`` (module doc)."""
    inter = np.einsum("lij,lir,ljr->", problem.trans_w, presence[:-1], presence[1:], optimize=True)
    intra = 0.5 * np.einsum("lij,lir,ljr->", problem.coact_w, presence, presence, optimize=True)
    return float(inter + intra)


def inter_gain(problem: AffinityProblem, presence: np.ndarray, layer: int) -> np.ndarray:
    """[E, R]: kept transition mass per (expert, rank) of ``layer`` given its neighbours."""
    gain = np.zeros((problem.num_experts, problem.num_ranks))
    if layer > 0:
        gain += problem.trans_w[layer - 1].T @ presence[layer - 1]
    if layer < problem.num_layers - 1:
        gain += problem.trans_w[layer] @ presence[layer + 1]
    return gain


def layer_score(problem: AffinityProblem, layer: int, pres: np.ndarray, gain: np.ndarray) -> float:
    """Part of the score that depends on layer ``layer``'s presence ``pres: [E, R]``."""
    coact = problem.coact_w[layer]
    return float((gain * pres).sum() + 0.5 * np.einsum("ij,ir,jr->", coact, pres, pres, optimize=True))


def rank_load(problem: AffinityProblem, layer: int, pres: np.ndarray) -> np.ndarray:
    """[R]: load of every rank for layer ``layer`` and presence ``pres: [E, R]``."""
    return problem.slot_load[layer] @ pres


def overload(problem: AffinityProblem, presence: np.ndarray) -> float:
    """Largest excess of a rank's load over ``max_rank_load`` (0 when the cap holds)."""
    if problem.max_rank_load is None:
        return 0.0
    loads = np.einsum("le,ler->lr", problem.slot_load, presence)
    return float(max(0.0, (loads - problem.max_rank_load[:, None]).max()))


def load_lower_bound(loads: np.ndarray, logcnt: np.ndarray, capacity: np.ndarray) -> LoadBound:
    """A proven lower bound on the imbalance of any plan with these replica and slot counts.

    loads, logcnt: [layers, E]; capacity: [layers, R]. The rank holding the hottest
    replica carries its share plus at least the ``min(capacity) - 1`` smallest other
    replica shares.
    """
    best = LoadBound(1.0, 0, 0, 0.0)
    num_ranks = capacity.shape[1]
    slot_load = loads / logcnt
    for layer in range(loads.shape[0]):
        mean = loads[layer].sum() / num_ranks
        if mean <= 0:
            continue
        shares = np.sort(np.repeat(slot_load[layer], logcnt[layer]))
        rest = shares[:-1][: int(capacity[layer].min()) - 1].sum()
        bound = max(1.0, (shares[-1] + rest) / mean)
        if bound > best.imbalance:
            hottest = int(np.argmax(slot_load[layer]))
            best = LoadBound(float(bound), layer, hottest, float(slot_load[layer, hottest] / mean))
    return best


def layout_from_presence(presence: np.ndarray) -> Layout:
    """presence: [layers, E, R] -> phy2log, slot2rank [layers, slots]; slots rank-major
    (rank 0's slots first), experts ascending within a rank."""
    phy2log, slot2rank = [], []
    for pres in presence:
        ranks, experts = np.nonzero(pres.T > 0.5)
        phy2log.append(experts)
        slot2rank.append(ranks)
    return Layout(np.stack(phy2log).astype(np.int64), np.stack(slot2rank).astype(np.int64))
