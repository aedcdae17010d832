"""What an expert rank computes from the rows it received, in both layouts."""

from __future__ import annotations

import torch

from raymoe.workers.model.experts import ExpertStack


def weighted_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     stack: ExpertStack) -> tuple[torch.Tensor, int]:
    """``x [N, D]`` through the local experts ``ids [N, A]`` (-1 = elsewhere, or a padding
    row), weighted by ``weights [N, A]`` and summed per row -> ``[N, D]``; and the number
    of pairs computed. Rows without a local expert come out zero.

    Each row's partials are added in top-k order, as the single-process ``combine`` does.
    """
    row, column = torch.nonzero(ids >= 0, as_tuple=True)  # pairs, row-major = top-k order
    out = torch.zeros_like(x)
    if len(row):
        y = stack(x[row], ids[row, column]) * weights[row, column, None].to(x.dtype)
        out.index_add_(0, row, y)
    return out, len(row)
