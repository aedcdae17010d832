"""Routers: which experts each token goes to, and with what weight.

Shapes: T = tokens, E = routed experts, A = activated experts per token (top-k),
G = groups. Routing is separate from expert execution so the runtime can move tokens
between the two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.workers.model.config import RouterConfig
from raymoe.workers.model.linear import k_major


class Routing(NamedTuple):
    """``topk_ids [T, A]`` (int64 logical expert ids), ``topk_weights [T, A]`` (float32),
    ``logits [T, E]`` (float32 router logits, for auxiliary losses and statistics)."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    logits: torch.Tensor


def _group_limited(choice: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Mask ``choice [T, E]`` to the ``topk_group`` best of ``n_group`` expert groups."""
    grouped = choice.view(choice.shape[0], cfg.n_group, cfg.num_experts // cfg.n_group)  # [T, G, E/G]
    if cfg.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = group_scores.topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape_as(choice), float("-inf"))


def _moge_topk(choice: torch.Tensor, groups: int, top_k: int) -> torch.Tensor:
    """MoGE: top ``top_k / groups`` inside each of ``groups`` contiguous groups -> ids [T, A]."""
    per_group = choice.shape[1] // groups
    local = choice.view(choice.shape[0], groups, per_group).topk(top_k // groups, dim=-1).indices
    offsets = torch.arange(groups, device=choice.device)[None, :, None] * per_group
    return (local + offsets).reshape(choice.shape[0], top_k)


def select_experts(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None) -> Routing:
    """Router logits ``[T, E]`` -> ``Routing`` under the family's semantics (see RouterConfig)."""
    logits = logits.float()
    # Step 1: scores, and the (possibly biased) values experts are chosen by.
    scores = logits.softmax(dim=-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores + bias.float() if cfg.correction_bias and bias is not None else scores
    # Step 2: choose the experts; their weights come from the unbiased scores.
    if cfg.moge_groups:
        ids = _moge_topk(choice, cfg.moge_groups, cfg.top_k)
        weights = scores.gather(1, ids)
    elif choice is scores and cfg.n_group == 1:  # chosen by the scores: topk's values are the weights
        weights, ids = scores.topk(cfg.top_k, dim=-1)
    else:
        if cfg.n_group > 1:
            choice = _group_limited(choice, cfg)
        ids = choice.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
    # Step 3: renormalise and/or scale.
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if not (cfg.norm_topk_prob and cfg.scale_only_unnormalised) and cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return Routing(ids, weights, logits)


class Router(nn.Module):
    """``weight [E, D]``; DeepSeek-V3 also has ``e_score_correction_bias [E]``."""

    def __init__(self, hidden_size: int, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(k_major(torch.zeros(cfg.num_experts, hidden_size)))
        if cfg.correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        """``x [T, D]`` -> ``Routing``."""
        return select_experts(F.linear(x.float(), self.weight.float()), self.cfg, self.e_score_correction_bias)
