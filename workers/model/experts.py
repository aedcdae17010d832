"""Routed experts as stacked weights and their grouped computation.

Shapes: N = (token, expert) pairs, E = experts held here, D = hidden, I = expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertStack(nn.Module):
    """``gate_up [E, 2I, D]`` (gate rows first, then up rows) and ``down [E, D, I]``.

    Holds any subset of a layer's experts: the full set in the reference engine, one
    rank's slots in an ExpertWorker. Ids passed to ``forward`` index this stack.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """``x [N, D]``, ``expert_ids [N]`` (local) -> ``[N, D]``: row n through expert ids[n].

        Rows are sorted by expert and each expert runs one GEMM over its rows (a loop
        over experts, never over tokens).
        """
        order = torch.argsort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
        sorted_x = x[order]
        out = torch.empty_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = sorted_x[start : start + count]
                gate, up = F.linear(rows, self.gate_up[expert]).chunk(2, dim=-1)
                out[order[start : start + count]] = F.linear(F.silu(gate) * up, self.down[expert])
                start += count
        return out


def combine(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``expert_out [T, A, D]`` weighted by ``weights [T, A]`` and summed over A -> ``[T, D]``.

    The one place partial outputs meet: the reference engine and the runtime both use it,
    so they add in the same order.
    """
    return (expert_out * weights[..., None].to(expert_out.dtype)).sum(dim=1)
