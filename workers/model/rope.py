"""Rotary position embeddings (default RoPE), in the two layouts checkpoints use.

Shapes: T = tokens, H = heads, R = rotary dims.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RopeTables(NamedTuple):
    """Per-token tables of ``apply_rope``, ``[T, 1, R]`` each (``[T, 1, R/2]`` interleaved).

    ``sin`` carries the rotation's sign: ``[-sin, sin]`` over the two halves (not
    interleaved), so a rotation is ``x * cos + roll(x, R/2) * sin``.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    interleave: bool


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos, sin for ``positions [T]``: each ``[T, R]`` with R = ``dim`` (halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_tables(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype,
                interleave: bool = False) -> RopeTables:
    """The tables for ``positions [T]`` (computed once per step, shared by every layer)."""
    cos, sin = rope_cos_sin(positions, dim, theta, dtype)
    half = dim // 2
    if interleave:
        return RopeTables(cos[:, None, :half], sin[:, None, :half], True)
    return RopeTables(cos[:, None, :], torch.cat((-sin[:, :half], sin[:, half:]), -1)[:, None, :], False)


def apply_rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate ``x [T, H, R]`` by position.

    interleave=False: pairs are (x_i, x_{i+R/2}) (Llama, Mixtral, Qwen, OLMoE).
    interleave=True: pairs are (x_{2i}, x_{2i+1}) (DeepSeek); the result is laid out as
    [rotated evens, rotated odds], the same for queries and keys, so dot products match.
    """
    cos, sin = tables.cos, tables.sin
    if not tables.interleave:
        # = x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]: the same bits,
        # since (-a) * b == a * (-b) exactly.
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
