"""Routed experts with weight-only int8 or int4 weights (``quantization.experts``), as
EdgeMoE, QMoE and vLLM's weight-only modes keep them: the experts are most of an MoE's
bytes, and decoding reads every active expert's weights once per token.

- ``int8``: per output channel, symmetric: ``W[n, :] = q[n, :] * scale[n]``, q in
  [-127, 127]; run by ``torch._weight_int8pack_mm``.
- ``int4``: per group of ``group_size`` input columns, asymmetric: ``W[n, k] =
  (q[n, k] - 8) * scale[n, g] + zero[n, g]``, q in [0, 15], g = k // group_size; packed by
  ``torch._convert_weight_to_int4pack_for_cpu`` and run by
  ``torch._weight_int4pack_mm_for_cpu``. Group sizes 32, 64, 128 or 256; every
  matrix's rows a multiple of 16.

Both run on CPUs only: torch's CUDA weight-only kernels take other packings and were
neither wired nor measured here (no GPU), so quantized experts on GPUs are refused.

Activations stay in the serving dtype; the kernels dequantize on the fly. A
``QuantizedExpertStack`` is built from an ``ExpertStack`` at load (``quantize_stack``)
and has its interface: ``forward(x, expert_ids)``, one GEMM per expert over its rows in
row order (the kernels compute each row alone, so the reference engine and the expert
ranks get the same bits from the same weights). Memory: ``nbytes``.

Shapes: E experts, D hidden, I expert width; gate_up is ``[2I, D]`` and down ``[D, I]``
per expert (out x in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.workers.model.experts import ExpertStack, per_expert

MODES = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel takes


class ExpertQuantizationError(ValueError):
    """The experts cannot be quantized as asked (a dimension the kernel does not take)."""

    def __init__(self, field: str, value: object, fix: str):
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field} = {value!r}: {fix}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (int8 ``[N, K]``, float32 scales ``[N]``)."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (int32 ``[N, K]`` in [0, 15], float32 scales and zeros
    ``[K / group, N, 2]``, the layout of ``_weight_int4pack_mm_for_cpu``)."""
    n, k = w.shape
    tiles = w.float().view(n, k // group, group)
    low, high = tiles.amin(-1), tiles.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((tiles - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    zero = low + 8 * scale  # (q - 8) * scale + zero == low + q * scale
    return q, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def dequantize_int4(q: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    scale, zero = scales_zeros.transpose(0, 1).unbind(-1)  # [N, K / group] each
    return ((q.view(n, k // group, group).float() - 8) * scale[..., None] + zero[..., None]).view(n, k)


class QuantizedExpertStack(nn.Module):
    """A layer's experts (any subset, as ``ExpertStack``) with int8 or int4 weights."""

    def __init__(self, mode: str, weights: dict[str, list[torch.Tensor]], num_experts: int, group_size: int):
        """``weights``: per matrix name (``gate_up``, ``down``), per expert, the packed
        weight and its scales, as ``quantize_stack`` makes them."""
        super().__init__()
        self.mode, self.group_size, self._num_experts = mode, group_size, num_experts
        for name, tensors in weights.items():
            for index, tensor in enumerate(tensors):  # expert e: weight at 2e, scales at 2e + 1
                self.register_buffer(f"{name}_{index}", tensor)

    @property
    def num_experts(self) -> int:
        return self._num_experts

    def nbytes(self) -> int:
        """Bytes of the packed weights and their scales."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def _mm(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        weight, scales = getattr(self, f"{name}_{2 * expert}"), getattr(self, f"{name}_{2 * expert + 1}")
        if self.mode == "int8":
            return torch._weight_int8pack_mm(x, weight, scales)
        return torch._weight_int4pack_mm_for_cpu(x, weight, self.group_size, scales)

    def _expert(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = self._mm(rows, "gate_up", expert).chunk(2, dim=-1)
        return self._mm(F.silu(gate) * up, "down", expert)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """``x [N, D]``, ``expert_ids [N]`` (local) -> ``[N, D]``: rows sorted by expert, one
        GEMM per expert and projection (the kernels compute every row alone)."""
        if x.shape[0] == 0:
            return torch.empty_like(x)
        return per_expert(x, expert_ids, self.num_experts, self._expert)


def check_device(mode: str, device) -> None:
    """Quantized experts (``mode`` other than none) run on CPUs only: torch's CUDA
    weight-only kernels take other packings, not wired."""
    if mode != "none" and torch.device(device).type != "cpu":
        raise ExpertQuantizationError("quantization.experts", mode, "quantized experts run on CPUs only (torch's "
                                      "CUDA weight-only kernels are not wired): use none on GPUs")


def check_quantizable(mode: str, group_size: int, hidden_size: int, intermediate_size: int, device) -> None:
    """Raise ``ExpertQuantizationError`` naming the field when the kernels cannot take
    these experts."""
    if mode not in MODES:
        raise ExpertQuantizationError("quantization.experts", mode, f"one of {list(MODES)}")
    if mode == "none":
        return
    check_device(mode, device)
    if mode != "int4":
        return
    if group_size not in GROUP_SIZES:
        raise ExpertQuantizationError("quantization.group_size", group_size, f"one of {list(GROUP_SIZES)}")
    for name, size in (("hidden_size", hidden_size), ("moe_intermediate_size", intermediate_size)):
        if size % group_size or size % 16:
            raise ExpertQuantizationError("quantization.group_size", group_size,
                                          f"int4 needs the model's {name} ({size}) to be a multiple of the group "
                                          "size and of 16: use a group size that divides it, or int8")


def quantize_stack(stack: ExpertStack, mode: str, group_size: int = 32) -> ExpertStack | QuantizedExpertStack:
    """``stack``'s experts with ``mode`` weights (``none``: ``stack`` itself)."""
    if mode == "none":
        return stack
    experts, hidden = stack.num_experts, stack.down.shape[1]
    inter = stack.down.shape[2]
    device, dtype = stack.down.device, stack.down.dtype
    check_quantizable(mode, group_size, hidden, inter, device)
    weights: dict[str, list[torch.Tensor]] = {"gate_up": [], "down": []}
    with torch.no_grad():
        for expert in range(experts):
            for name in ("gate_up", "down"):
                w = getattr(stack, name)[expert].contiguous()  # [N, K]
                if mode == "int8":
                    q, scales = quantize_int8(w)
                    packed, scales = q.contiguous(), scales.to(dtype)
                else:
                    q, scales = quantize_int4(w.cpu(), group_size)
                    packed, scales = torch._convert_weight_to_int4pack_for_cpu(q, 1), scales.to(dtype)
                weights[name] += [packed.to(device), scales.to(device)]
    return QuantizedExpertStack(mode, weights, experts, group_size)


def quantize_model_experts(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Every MoE layer's routed experts of ``model`` (an ``MoEForCausalLM`` holding them)
    replaced by their ``mode`` stack, in place; returns ``model``."""
    if mode == "none":
        return model
    for layer in model.model.layers:
        if layer.is_moe and layer.mlp.experts is not None:
            layer.mlp.experts = quantize_stack(layer.mlp.experts, mode, group_size)
    return model


def stack_nbytes(stack: nn.Module) -> int:
    """Bytes of a layer's expert weights, quantized or not."""
    if isinstance(stack, QuantizedExpertStack):
        return stack.nbytes()
    return sum(p.numel() * p.element_size() for p in stack.parameters())
