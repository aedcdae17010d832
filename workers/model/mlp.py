"""The gated SiLU MLP: dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.workers.model.linear import FusedLinear, linear


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``: ``x [T, D]`` -> ``[T, D]``; gate and up are one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = linear(intermediate_size, hidden_size, bias=bias)
        self.gate_up = FusedLinear(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
