"""What a plan costs on a given routing: cross-device and inter-node traffic, imbalance.

Definitions (pair-based, the same for top-1 and top-k; placement/README.md):

* A *transition* is a triple (token, expert i at layer l, expert j at layer l+1), i and j
  in the token's top-k at l and l+1 (``top_k**2`` per token and layer boundary;
  ``RoutingStats.transitions`` counts them). For top-1 this is ExFlow's (token, layer)
  transition.
* **cross-device fraction** = share of transitions whose j is not on the token's rank.
  With replicas, a token at a replicated expert i sits on each of i's replicas with
  equal probability (the same even split the load accounting uses), and takes j's
  replica on that rank when there is one. So transition (i, j) is local with
  probability ``|R_l(i) & R_{l+1}(j)| / |R_l(i)|``, R = set of ranks holding a replica.
  Without replicas: ``rank(i) == rank(j)``.
* **inter-node fraction**: the same with nodes in place of ranks.
* **co-activation split fraction** (top-k > 1): share of co-activated pairs (i, j at one
  layer, one token) whose experts share no rank; a pair with replicas counts as kept
  in proportion ``|R(i) & R(j)| / min(|R(i)|, |R(j)|)`` (the token picks co-located
  replicas when there are some).
* **rank load**: tokens a rank processes; a token routed to an expert with c replicas
  adds 1/c to each replica's rank. **imbalance** = max rank load / mean rank load per
  layer (1.0 is perfect), **balancedness** = its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymoe.placement.plan import PlacementPlan
from raymoe.placement.trace import RoutingStats, RoutingTrace


@dataclass(frozen=True)
class StepImbalance:
    batch_size: int
    num_batches: int
    mean: float   # mean over (batch, layer) of max/mean rank load
    p99: float
    max: float


@dataclass(frozen=True, eq=False)
class PlanScore:
    cross_device_fraction: float | None    # None without transitions
    inter_node_fraction: float | None      # None without transitions or with one node
    coactivation_split_fraction: float | None  # None without co-activation (top-1)
    imbalance: np.ndarray | None           # float64 [layers]; None without loads
    per_step: tuple[StepImbalance, ...] = ()

    @property
    def imbalance_mean(self) -> float | None:
        return None if self.imbalance is None else float(self.imbalance.mean())

    @property
    def imbalance_max(self) -> float | None:
        return None if self.imbalance is None else float(self.imbalance.max())

    @property
    def balancedness_mean(self) -> float | None:
        return None if self.imbalance is None else float((1.0 / self.imbalance).mean())


def replica_share(presence: np.ndarray) -> np.ndarray:
    """presence: [layers, experts, ranks] 0/1 -> share of the expert's tokens each rank
    takes: presence / logcnt, [layers, experts, ranks]."""
    cnt = presence.sum(axis=2, keepdims=True)
    return presence / np.maximum(cnt, 1.0)


def rank_loads(presence: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """presence: [layers, experts, ranks]; loads: [layers, experts] -> [layers, ranks]."""
    return np.einsum("le,ler->lr", loads, replica_share(presence))


def imbalance_of(rank_load: np.ndarray) -> np.ndarray:
    """rank_load: [..., ranks] -> max / mean over ranks, [...] (1.0 where the load is 0)."""
    mean = rank_load.mean(axis=-1)
    top = rank_load.max(axis=-1)
    return np.where(mean > 0, top / np.where(mean > 0, mean, 1.0), 1.0)


def kept_transitions(presence: np.ndarray, transitions: np.ndarray,
                     target: np.ndarray | None = None) -> float:
    """Transition mass that stays local (see module doc).

    presence: [layers, experts, ranks]; transitions: [layers-1, experts, experts];
    target: [layers, experts, ranks] where j counts as present on r (default
    ``presence``; a node-expanded presence gives the inter-node variant).
    """
    target = presence if target is None else target
    share = replica_share(presence)[:-1]                       # [L-1, E(i), R]
    arrive = transitions.transpose(0, 2, 1) @ share            # [L-1, E(j), R] mass reaching j from rank r
    return float(np.einsum("ljr,ljr->", arrive, np.minimum(target[1:], 1.0)))


def node_presence(presence: np.ndarray, num_nodes: int) -> np.ndarray:
    """[layers, experts, ranks] -> 1 where the rank's node holds a replica of the expert."""
    layers, experts, ranks = presence.shape
    per_node = presence.reshape(layers, experts, num_nodes, ranks // num_nodes).max(axis=3)
    return np.repeat(per_node, ranks // num_nodes, axis=2)


def cross_device_fraction(presence: np.ndarray, transitions: np.ndarray) -> float:
    """Share of transitions that change rank. presence: [L, E, R]; transitions: [L-1, E, E]."""
    total = float(transitions.sum())
    return 0.0 if total == 0 else 1.0 - kept_transitions(presence, transitions) / total


def inter_node_fraction(presence: np.ndarray, transitions: np.ndarray, num_nodes: int) -> float:
    """Share of transitions that change node. presence: [L, E, R]; transitions: [L-1, E, E]."""
    total = float(transitions.sum())
    if total == 0:
        return 0.0
    return 1.0 - kept_transitions(presence, transitions, node_presence(presence, num_nodes)) / total


def coactivation_split_fraction(presence: np.ndarray, coactivation: np.ndarray) -> float:
    """Share of co-activated pairs on no common rank. presence: [L, E, R]; coactivation: [L, E, E]."""
    total = float(coactivation.sum())
    if total == 0:
        return 0.0
    cnt = presence.sum(axis=2)
    overlap = presence @ presence.transpose(0, 2, 1)         # [L, E, E] ranks in common
    kept = (coactivation * overlap / np.maximum(np.minimum(cnt[:, :, None], cnt[:, None, :]), 1.0)).sum()
    return 1.0 - float(kept) / total


def decode_order(trace: RoutingTrace) -> np.ndarray:
    """int64 [tokens]: the order in which decode steps would see the tokens.

    With ``seq_ids`` naming two or more requests, step t takes the t-th token of every
    request (requests interleaved, as continuous batching runs them); otherwise the
    trace order."""
    if trace.seq_ids is None or len(np.unique(trace.seq_ids)) < 2:
        return np.arange(trace.num_tokens)
    order = np.argsort(trace.seq_ids, kind="stable")
    sorted_ids = trace.seq_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    step = np.empty(trace.num_tokens, dtype=np.int64)
    step[order] = np.arange(trace.num_tokens) - np.repeat(starts, np.diff(np.r_[starts, trace.num_tokens]))
    return np.lexsort((trace.seq_ids, step))


def per_step_imbalance(presence: np.ndarray, trace: RoutingTrace, batch_size: int) -> StepImbalance:
    """Imbalance of decode steps: the trace's tokens in ``decode_order`` cut into
    batches of ``batch_size`` (decode tokens only when the trace marks prompt tokens
    and has a full batch of decode tokens; the tail that does not fill a batch is
    dropped).

    presence: [layers, experts, ranks]. Returns mean, p99 and max over (batch, layer).
    """
    ids = trace.topk_ids[decode_order(trace)]
    if trace.is_prompt is not None and (~trace.is_prompt).sum() >= batch_size:
        ids = ids[~trace.is_prompt[decode_order(trace)]]
    num_batches = ids.shape[0] // batch_size
    if num_batches == 0:
        return StepImbalance(batch_size, 0, float("nan"), float("nan"), float("nan"))
    layers, experts = trace.num_layers, trace.num_experts
    ids = ids[: num_batches * batch_size].reshape(num_batches, batch_size, layers, -1)
    flat = (np.arange(num_batches)[:, None, None, None] * layers
            + np.arange(layers)[None, None, :, None]) * experts + ids
    counts = np.bincount(flat.ravel(), minlength=num_batches * layers * experts)
    counts = counts.reshape(num_batches, layers, experts).astype(np.float64)
    imb = imbalance_of(np.einsum("ble,ler->blr", counts, replica_share(presence), optimize=True))
    return StepImbalance(batch_size, num_batches, float(imb.mean()), float(np.percentile(imb, 99)),
                         float(imb.max()))


def score_plan(plan: PlacementPlan, stats: RoutingStats | None = None, loads: np.ndarray | None = None,
               trace: RoutingTrace | None = None, batch_sizes: tuple[int, ...] = ()) -> PlanScore:
    """Every metric of the module doc that the inputs allow.

    stats: transitions/co-activation (and loads); loads: [layers, experts] overrides
    ``stats.loads``; trace: per-token routing for per-step imbalance at ``batch_sizes``.
    """
    if trace is not None and stats is None:
        stats = trace.stats()
    if loads is None and stats is not None:
        loads = stats.loads
    pres = plan.presence
    trans = None if stats is None else stats.transitions
    coact = None if stats is None else stats.coactivation
    return PlanScore(
        cross_device_fraction=None if trans is None else cross_device_fraction(pres, trans),
        inter_node_fraction=None if trans is None or plan.num_nodes == 1 else inter_node_fraction(
            pres, trans, plan.num_nodes),
        coactivation_split_fraction=None if coact is None else coactivation_split_fraction(pres, coact),
        imbalance=None if loads is None else imbalance_of(rank_loads(pres, np.asarray(loads, float))),
        per_step=tuple(per_step_imbalance(pres, trace, b) for b in batch_sizes) if trace is not None else (),
    )
