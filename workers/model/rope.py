"""Rotary position embeddings (default RoPE), in the two layouts checkpoints use.

Shapes: T = tokens, H = heads, R = rotary dims.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos, sin for ``positions [T]``: each ``[T, R]`` with R = ``dim`` (halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate ``x [T, H, R]`` by position.

    interleave=False: pairs are (x_i, x_{i+R/2}) (Llama, Mixtral, Qwen, OLMoE).
    interleave=True: pairs are (x_{2i}, x_{2i+1}) (DeepSeek); the result is laid out as
    [rotated evens, rotated odds], the same for queries and keys, so dot products match.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    if not interleave:
        return x * cos + _rotate_half(x) * sin
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
