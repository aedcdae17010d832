"""Mixture of Grouped Experts (MoGE, Pangu Pro MoE): group g on rank g.

The E experts of a layer form M equal groups of consecutive ids (group g = experts
[g E/M, (g+1) E/M)); the MoGE router makes every token pick exactly K/M experts in
every group. With group g on rank g (or, for M a multiple of R, groups
[r M/R, (r+1) M/R) on rank r) every rank then receives exactly K/M x (groups per
rank) tokens per token: the imbalance is exactly 1.0 on any batch, by construction.
"""

from __future__ import annotations

import numpy as np

from raymoe.placement.errors import ConfigError, TraceError
from raymoe.placement.plan import Layout


def _check_groups(num_experts: int, num_ranks: int, num_groups: int) -> None:
    if num_groups < 1 or num_experts % num_groups:
        raise ConfigError("num_groups", num_groups, f"must divide num_experts = {num_experts}",
                          "pick a divisor of the expert count (MoGE groups are equal)")
    if num_groups % num_ranks:
        raise ConfigError("num_groups", num_groups, f"must be a multiple of num_ranks = {num_ranks}",
                          "use num_groups = num_ranks (group g on rank g)")


def moge_layout(num_layers: int, num_experts: int, num_ranks: int, num_groups: int | None = None) -> Layout:
    """phy2log, slot2rank: [layers, experts]; group g on rank g // (num_groups / num_ranks)."""
    num_groups = num_ranks if num_groups is None else num_groups
    _check_groups(num_experts, num_ranks, num_groups)
    experts = np.arange(num_experts)
    group = experts // (num_experts // num_groups)
    rank = group // (num_groups // num_ranks)
    return Layout(np.tile(experts, (num_layers, 1)), np.tile(rank, (num_layers, 1)))


def moge_route(scores: np.ndarray, top_k: int, num_groups: int) -> np.ndarray:
    """The MoGE router: top (top_k / num_groups) experts of every group.

    scores: [tokens, layers, experts] router logits -> topk_ids int64 [tokens, layers,
    top_k], best score first.
    """
    tokens, layers, num_experts = scores.shape
    if top_k % num_groups or num_experts % num_groups:
        raise ConfigError("top_k", top_k, f"MoGE needs top_k and num_experts ({num_experts}) divisible by "
                          f"num_groups = {num_groups}", "pick top_k = a multiple of the group count")
    size, per_group = num_experts // num_groups, top_k // num_groups
    grouped = scores.reshape(tokens, layers, num_groups, size)
    local = np.argsort(-grouped, axis=-1, kind="stable")[..., :per_group]
    ids = (local + (np.arange(num_groups) * size)[:, None]).reshape(tokens, layers, top_k)
    order = np.argsort(-np.take_along_axis(scores, ids, -1), axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1).astype(np.int64)


def check_moge_routing(topk_ids: np.ndarray, num_experts: int, num_groups: int) -> None:
    """Raise TraceError unless every token picks top_k / num_groups experts per group.

    topk_ids: [tokens, layers, top_k].
    """
    top_k = topk_ids.shape[-1]
    if top_k % num_groups:
        raise TraceError("trace", "top_k", top_k, f"not divisible by num_groups = {num_groups}",
                         "MoGE routing needs top_k = a multiple of the group count")
    group = topk_ids // (num_experts // num_groups)
    counts = np.stack([(group == g).sum(-1) for g in range(num_groups)], -1)
    bad = np.argwhere((counts != top_k // num_groups).any(-1))
    if len(bad):
        t, l = (int(v) for v in bad[0])
        raise TraceError("trace", f"topk_ids[{t}, {l}]", topk_ids[t, l].tolist(),
                         f"picks {counts[t, l].tolist()} experts per group, not {top_k // num_groups} each",
                         "route with the MoGE router (moge_route) or use another policy")
