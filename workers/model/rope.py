"""Rotary position embeddings, in the two layouts checkpoints use, with the scaled
frequencies of long-context checkpoints (``RopeScaling``: linear, llama3, yarn).

The frequencies follow transformers' ``modeling_rope_utils`` formula by formula (the
tests compare logits against it): ``inv_freq [R/2]`` and an ``attention_factor`` that
multiplies cos and sin; DeepSeek's yarn also scales the attention's softmax
(``softmax_scale``). ``dynamic`` (NTK) and ``longrope`` change the frequencies with the
sequence length and are refused at load.

Shapes: T = tokens, H = heads, R = rotary dims.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """A checkpoint's ``rope_parameters`` (``rope_scaling`` before transformers 5) beyond
    ``rope_theta``."""

    rope_type: str  # one of ROPE_TYPES but "default"
    factor: float
    original_max_position_embeddings: int | None = None  # llama3, yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn (DeepSeek: also scales the softmax)
    attention_factor: float | None = None  # yarn: None = from factor and the mscales
    truncate: bool = True  # yarn


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@functools.lru_cache(maxsize=32)
def _frequencies(dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """(``inv_freq [dim/2]`` float32, the factor on cos and sin), on the CPU."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if scaling is None:
        return 1.0 / (theta ** exponents), 1.0
    if scaling.rope_type == "linear":
        return 1.0 / (theta ** exponents) / scaling.factor, 1.0
    if scaling.rope_type == "llama3":
        inv_freq = 1.0 / (theta ** exponents)
        factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
        old = scaling.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    old = scaling.original_max_position_embeddings
    factor = scaling.factor
    attention = scaling.attention_factor
    if attention is None:
        attention = (_yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
                     if scaling.mscale and scaling.mscale_all_dim else _yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** exponents
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, float(attention)


def softmax_scale(head_dim: int, scaling: RopeScaling | None) -> float:
    """The attention's softmax scale: ``1/sqrt(head_dim)``, times mscale twice for
    DeepSeek's yarn with ``mscale_all_dim`` (in transformers' order of multiplication)."""
    scale = head_dim ** -0.5
    if scaling is not None and scaling.mscale_all_dim:
        m = _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        scale = scale * m * m
    return scale


class RopeTables(NamedTuple):
    """Per-token tables of ``apply_rope``, ``[T, 1, R]`` each (``[T, 1, R/2]`` interleaved).

    ``sin`` carries the rotation's sign: ``[-sin, sin]`` over the two halves (not
    interleaved), so a rotation is ``x * cos + roll(x, R/2) * sin``.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    interleave: bool


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype,
                 scaling: RopeScaling | None = None):
    """cos, sin for ``positions [T]``: each ``[T, R]`` with R = ``dim`` (halves repeated)."""
    inv_freq, attention = _frequencies(dim, float(theta), scaling)
    freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.to(dtype), sin.to(dtype)


def rope_tables(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype,
                interleave: bool = False, scaling: RopeScaling | None = None) -> RopeTables:
    """The tables for ``positions [T]`` (computed once per step, shared by every layer)."""
    cos, sin = rope_cos_sin(positions, dim, theta, dtype, scaling)
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
