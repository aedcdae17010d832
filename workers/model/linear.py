"""Linear layers laid out for small-batch GEMMs, and several projections as one GEMM.

Shapes: T = tokens, K = input features, N = output features.

``linear(K, N)`` is an ``nn.Linear`` whose weight ``[N, K]`` is stored K-major (its
transpose ``[K, N]`` is contiguous): ``F.linear`` then multiplies by a plain row-major
matrix, which CPU BLAS does 1.3-1.8x faster at 1-16 rows (the tiny model's shapes, one
thread). Names, state dicts and checkpoint loading are those of ``nn.Linear``; ``.to()``
and ``to_empty`` keep the layout (a transposed contiguous tensor is dense). With 1-5
rows the two layouts run different BLAS kernels that round differently, so every weight
of the model (ExpertStack's too) uses this one: the reference engine, the front-end and
the expert ranks then compute the same bits.

``FusedLinear(q_proj, k_proj, v_proj)`` concatenates the modules' weights (and biases)
along N and makes every parameter a view into the result: one GEMM computes all three,
and an in-place load (``load_state_dict`` copies into the parameters) fills the fused
tensor too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def k_major(weight: torch.Tensor) -> torch.Tensor:
    """The same values ``[..., N, K]`` stored with the last two dims swapped in memory."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


def linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """``nn.Linear`` with a K-major weight."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.weight.data = k_major(layer.weight.data)
    return layer


def _concat(tensors: list[torch.Tensor], sizes: list[int], dim: int = 0) -> torch.Tensor:
    """``torch.cat(tensors, dim)`` by copies into slices of one new tensor: on the meta
    device (models built for their shapes) ``torch.cat`` runs a Python reference that
    imports ``torch._dynamo``, 2 s of CPU in every process that builds a model."""
    shape = list(tensors[0].shape)
    shape[dim] = sum(sizes)
    out = torch.empty(shape, dtype=tensors[0].dtype, device=tensors[0].device)
    for part, t in zip(out.split(sizes, dim=dim), tensors, strict=True):
        part.copy_(t)
    return out


class FusedLinear:
    """``x [T, K]`` -> ``[T, sum of N]``, the modules' outputs side by side.

    Not a module: it owns no parameters, so it adds nothing to the state dict. A weight
    moved or replaced (``.to()``, ``to_empty``, a new ``nn.Parameter``) is noticed by
    its address and the projections are fused again (biases move with their weights).
    With autograd on, the weights are concatenated on every call instead, so gradients
    reach the parameters.
    """

    def __init__(self, *linears: nn.Linear):
        if len({lin.bias is None for lin in linears}) != 1:
            raise ValueError("fused projections need a bias on all or on none")
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self._fuse()

    def _fuse(self) -> None:
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, loadable in place later
            self.weight = _concat([lin.weight.t() for lin in self.linears], self.sizes, dim=1).t()  # [N, K], K-major
            self.bias = None if self.linears[0].bias is None else _concat([lin.bias for lin in self.linears], self.sizes)
            for lin, weight in zip(self.linears, self.weight.split(self.sizes)):
                lin.weight.data = weight
            for lin, bias in zip(self.linears, self.bias.split(self.sizes) if self.bias is not None else ()):
                lin.bias.data = bias
        self._addresses = self._weight_addresses()

    def _weight_addresses(self) -> list[int]:
        # Module._parameters, not Module.__getattr__: 1.4 us against 5 us a call, and a
        # replaced parameter (load_state_dict(assign=True)) has a new address too.
        return [lin._parameters["weight"].data_ptr() for lin in self.linears]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            bias = None if self.bias is None else torch.cat([lin.bias for lin in self.linears])
            return F.linear(x, torch.cat([lin.weight for lin in self.linears]), bias)
        if self._weight_addresses() != self._addresses:
            self._fuse()
        return F.linear(x, self.weight, self.bias)
