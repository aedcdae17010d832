"""Routed experts as stacked weights and their grouped computation.

Shapes: N = (token, expert) pairs, E = experts held here, D = hidden, I = expert width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.workers.model.linear import k_major

# On CPU, up to this many rows go through their experts one GEMM each from Python; more
# rows take grouped_mm. Its CPU kernel loops over all E experts, empty ones too: ~100 us
# for the two projections at E = 16 whatever the rows, against ~22 us a row from Python.
# Measured on the tiny model (D = 128, I = 64, float32): grouped wins from 5-6 rows at
# E = 8 and E = 16.
FEW_ROWS = 4


@functools.cache
def _cuda_grouped_mm(device: torch.device) -> bool:
    """CUDA's grouped GEMM needs compute capability 8.0 (Ampere) or newer, and bfloat16."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


class ExpertStack(nn.Module):
    """``gate_up [E, 2I, D]`` (gate rows first, then up rows) and ``down [E, D, I]``.

    Holds any subset of a layer's experts: the full set in the reference engine, one
    rank's slots in an ExpertWorker. Ids passed to ``forward`` index this stack.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        # K-major, as linear.py explains: each expert's matrices multiply as plain row-major ones.
        self.gate_up = nn.Parameter(k_major(torch.empty(num_experts, 2 * intermediate_size, hidden_size)))
        self.down = nn.Parameter(k_major(torch.empty(num_experts, hidden_size, intermediate_size)))

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """``x [N, D]``, ``expert_ids [N]`` (local) -> ``[N, D]``: row n through expert ids[n].

        Every expert runs one GEMM over its rows, in row order, whichever path runs it:
        on CPU the paths give the same bits (tests/unit/test_fast_paths.py), so a row's
        result does not depend on how many other rows share the call.
        """
        if x.shape[0] == 0:
            return torch.empty_like(x)
        if not x.is_cuda and x.shape[0] <= FEW_ROWS:
            return self._few_rows(x, expert_ids)
        return self._grouped(x, expert_ids) if self._grouped_mm_runs(x) else self._loop(x, expert_ids)

    def _grouped_mm_runs(self, x: torch.Tensor) -> bool:
        """grouped_mm takes these rows: float32 or bfloat16 on CPU, bfloat16 on CUDA
        (compute capability >= 8.0), and every matrix row a multiple of 16 bytes."""
        width, hidden = self.down.shape[2], self.down.shape[1]
        if (width * x.element_size()) % 16 or (hidden * x.element_size()) % 16:
            return False
        if x.is_cuda:
            return x.dtype == torch.bfloat16 and _cuda_grouped_mm(x.device)
        return x.dtype in (torch.float32, torch.bfloat16)

    def _expert(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """``rows [n, D]`` through one expert -> ``[n, D]``."""
        gate, up = F.linear(rows, self.gate_up[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[expert])

    def _few_rows(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """A few rows with distinct experts (a decoding token's top-k): one GEMM per row,
        no sorting; rows sharing an expert go to ``_loop``."""
        ids = expert_ids.tolist()
        if len(set(ids)) < len(ids):
            return self._loop(x, expert_ids)
        out = [self._expert(expert, x[row : row + 1]) for row, expert in enumerate(ids)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _loop(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return per_expert(x, expert_ids, self.num_experts, self._expert)

    def _grouped(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, one grouped GEMM per projection (offsets stay on the device)."""
        order = torch.argsort(expert_ids, stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, expert_ids, torch.ones_like(expert_ids))  # [E]; bincount would ask the host for the size on CUDA
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(x[order], self.gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=offsets)  # [N, D], sorted
        return torch.empty_like(x).index_copy_(0, order, y)


def per_expert(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
               run: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Rows sorted by expert, a Python loop over the experts (never over tokens):
    ``run(expert, rows [n, D]) -> [n, D]`` once per expert with rows, in row order."""
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts).tolist()
    sorted_x = x[order]
    out = torch.empty_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            out[order[start : start + count]] = run(expert, sorted_x[start : start + count])
            start += count
    return out


def combine(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``expert_out [T, A, D]`` weighted by ``weights [T, A]`` and summed over A -> ``[T, D]``.

    The one place partial outputs meet: the reference engine and the runtime both use it,
    so they add in the same order.
    """
    return (expert_out * weights[..., None].to(expert_out.dtype)).sum(dim=1)
