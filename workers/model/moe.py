"""The MoE block: router, routed experts, optional shared expert(s).

Shapes: T = tokens, A = activated experts per token, D = hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from raymoe.workers.model.config import ModelConfig
from raymoe.workers.model.experts import ExpertStack, combine
from raymoe.workers.model.linear import linear
from raymoe.workers.model.mlp import GatedMLP
from raymoe.workers.model.router import Router, Routing


class MoEBlock(nn.Module):
    def __init__(self, config: ModelConfig, with_experts: bool = True):
        super().__init__()
        d = config.hidden_size
        self.gate = Router(d, config.router)
        # The front-end of the distributed runtime builds the block without experts.
        self.experts = ExpertStack(config.num_experts, d, config.moe_intermediate_size) if with_experts else None
        self.shared_expert = (
            GatedMLP(d, config.shared_expert_intermediate_size, config.mlp_bias)
            if config.shared_expert_intermediate_size else None
        )
        self.shared_expert_gate = linear(d, 1, bias=False) if config.shared_expert_gate else None

    def route(self, x: torch.Tensor) -> Routing:
        """``x [T, D]`` -> Routing (``topk_ids [T, A]``, ``topk_weights [T, A]``)."""
        return self.gate(x)

    def run_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Routed experts on this process: ``x [T, D]`` -> combined output ``[T, D]``."""
        tokens, top_k = routing.topk_ids.shape
        rows = x[:, None].expand(-1, top_k, -1).reshape(tokens * top_k, x.shape[1])  # [T * A, D]
        out = self.experts(rows, routing.topk_ids.reshape(-1)).view(tokens, top_k, x.shape[1])
        return combine(out, routing.topk_weights)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """Shared expert output ``[T, D]`` (already gated), or None."""
        if self.shared_expert is None:
            return None
        out = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out
