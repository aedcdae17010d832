"""Attention with a KV cache: grouped-query attention (GQA) and multi-head latent
attention (MLA, DeepSeek).

Shapes: T = new tokens in the batch, B = sequences, N = most new tokens of one
sequence, L = longest sequence length after this step, H = query heads, G = KV heads,
d = head dim, D = hidden.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.config import ModelConfig
from raymoe.workers.model.kv_cache import KVCache
from raymoe.workers.model.linear import FusedLinear, linear
from raymoe.workers.model.norm import RMSNorm
from raymoe.workers.model.rope import RopeScaling, RopeTables, apply_rope, rope_tables, softmax_scale


def cache_shapes(config: ModelConfig) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per layer, the shapes of one cached key and value (for MLA: latent, rotary key)."""
    if config.attention == "mla":
        shape = ((config.mla.kv_lora_rank,), (config.mla.qk_rope_head_dim,))
    else:
        shape = ((config.num_kv_heads, config.head_dim), (config.num_kv_heads, config.head_dim))
    return [shape] * config.num_layers


def _pad(batch: ForwardBatch, x: torch.Tensor) -> torch.Tensor:
    """``x [T, ...]`` -> ``[B, N, ...]`` (padding rows are zero; a decode batch is a view)."""
    if batch.decode:
        return x[:, None]
    out = x.new_zeros(batch.num_seqs, batch.max_new, *x.shape[1:])
    out[batch.seq_index, batch.query_index] = x
    return out


def _unpad(batch: ForwardBatch, x: torch.Tensor) -> torch.Tensor:
    """``x [B, N, ...]`` -> ``[T, ...]``: the inverse of ``_pad``."""
    return x[:, 0] if batch.decode else x[batch.seq_index, batch.query_index]


def _rope(batch: ForwardBatch, dim: int, theta: float, dtype: torch.dtype, interleave: bool = False,
          scaling: RopeScaling | None = None) -> RopeTables:
    """The batch's RoPE tables, computed by the first layer that asks and shared by the rest."""
    return batch.cached(("rope", dim, theta, dtype, interleave, scaling),
                        lambda: rope_tables(batch.positions, dim, theta, dtype, interleave, scaling))


def _mask(batch: ForwardBatch, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Causal mask ``[B, 1, N, L]`` to add to the scores (0 = may attend, -inf = may not),
    made once per step; None where every query sees all L keys (decode, equal lengths)."""
    if batch.decode and batch.min_len == length:
        return None

    def make() -> torch.Tensor:
        query_pos = _pad(batch, batch.positions)  # [B, N]; padding rows sit at position 0
        allowed = torch.arange(length, device=device)[None, None, :] <= query_pos[:, :, None]  # [B, N, L]
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))[:, None]

    return batch.cached(("mask", length, dtype), make)


def _store(batch: ForwardBatch, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int) -> None:
    """Write the batch's new keys and values into the cache (before any of them is read)."""
    rows = batch.cached(("kv_rows", id(cache)), lambda: cache.token_rows(batch.token_slots, batch.positions))
    cache.write(layer, batch.token_slots, batch.positions, k, v, rows)


def _load(batch: ForwardBatch, cache: KVCache, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every position up to the batch's longest sequence ``[B, L, ...]``."""
    blocks = batch.cached(("kv_read", id(cache)), lambda: cache.context_blocks(batch.slots, batch.max_len))
    keys, values = cache.read(layer, blocks, batch.max_len)
    return keys.to(dtype), values.to(dtype)


def _attend_parts(batch: ForwardBatch, q: torch.Tensor, context, scale: float) -> torch.Tensor:
    """Attention of ``q [T, H, d]`` part by part (``ForwardBatch.parts``): ``context(part)``
    gives a part's keys and values ``[B_i, L_i, ...]``. -> ``[T, H, dv]``."""
    parts = batch.parts()
    if len(parts) == 1:
        return _attend(batch, q, *context(batch), batch.max_len, scale)
    out = None
    for part, tokens in parts:
        o = _attend(part, q[tokens], *context(part), part.max_len, scale)
        if out is None:
            out = o.new_empty(q.shape[0], *o.shape[1:])
        out[tokens] = o
    return out


def _gpu_kernels():
    """SDPA kernels for CUDA without cuDNN: cuDNN builds a graph for every new KV length
    (about 13 ms of host time per call in bfloat16 on an H100; benchmarks/RESULTS.md "GPU")."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _attend(batch: ForwardBatch, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            length: int, scale: float) -> torch.Tensor:
    """Causal attention of ``q [T, H, d]`` over ``keys/values [B, L, G, d]`` -> ``[T, H, dv]``."""
    mask = _mask(batch, length, q.dtype, q.device)
    with _gpu_kernels() if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            _pad(batch, q).transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=keys.shape[2] != q.shape[1],
        )  # [B, H, N, dv]
    return _unpad(batch, out.transpose(1, 2))


class Attention(nn.Module):
    """GQA with RoPE; optional q/k/v bias, q/k RMSNorm (per head or whole projection), clip.

    q, k and v are one GEMM (``self.qkv``) over the separate projections' weights.
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        h, g, d, hidden = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        self.q_proj = linear(hidden, h * d, bias=config.qkv_bias)
        self.k_proj = linear(hidden, g * d, bias=config.qkv_bias)
        self.v_proj = linear(hidden, g * d, bias=config.qkv_bias)
        self.o_proj = linear(h * d, hidden, bias=config.o_bias)
        self.qkv = FusedLinear(self.q_proj, self.k_proj, self.v_proj)
        if config.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, config.rms_norm_eps), RMSNorm(d, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(h * d, config.rms_norm_eps)
            self.k_norm = RMSNorm(g * d, config.rms_norm_eps)

    def _norm_and_clip(self, qkv: torch.Tensor) -> torch.Tensor:
        """The families' q/k RMSNorm and clipping of ``qkv [T, (H + 2G) d]`` (OLMoE, Qwen3)."""
        c, t = self.config, qkv.shape[0]
        q, k, v = qkv.split(self.qkv.sizes, -1)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (x.clamp(-c.clip_qkv, c.clip_qkv) for x in (q, k, v))
        if c.qk_norm == "head":
            q = self.q_norm(q.view(t, c.num_heads, c.head_dim)).view(t, -1)
            k = self.k_norm(k.view(t, c.num_kv_heads, c.head_dim)).view(t, -1)
        return torch.cat((q, k, v), -1)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache | None) -> torch.Tensor:
        """``x [T, D]`` -> ``[T, D]``."""
        c = self.config
        h, g, d = c.num_heads, c.num_kv_heads, c.head_dim
        qkv = self.qkv(x)  # [T, (H + 2G) d]
        if c.qk_norm != "none" or c.clip_qkv is not None:
            qkv = self._norm_and_clip(qkv)
        heads = qkv.view(x.shape[0], h + 2 * g, d)
        r = c.rope_dim
        rope = _rope(batch, r, c.rope_theta, x.dtype, scaling=c.rope_scaling)
        qk = apply_rope(heads[:, : h + g], rope) if r == d else \
            torch.cat((apply_rope(heads[:, : h + g, :r], rope), heads[:, : h + g, r:]), -1)  # partial RoPE (GLM)
        q, k, v = qk[:, :h], qk[:, h:], heads[:, h + g :]
        if cache is None:  # training, scoring whole sequences: each starts at 0 and sees its new tokens
            out = _attend(batch, q, _pad(batch, k), _pad(batch, v), batch.max_new, d**-0.5)
        else:
            _store(batch, k, v, cache, self.layer)
            out = _attend_parts(batch, q, lambda part: _load(part, cache, self.layer, x.dtype), d**-0.5)
        return self.o_proj(out.reshape(x.shape[0], -1))


class LatentAttention(nn.Module):
    """MLA: keys and values are decompressed from a cached latent of ``kv_lora_rank``
    dims plus one shared rotary key of ``qk_rope_head_dim`` dims."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        m, h, hidden = config.mla, config.num_heads, config.hidden_size
        if m.q_lora_rank is None:
            self.q_proj = linear(hidden, h * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = linear(hidden, m.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank)
            self.q_b_proj = linear(m.q_lora_rank, h * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = linear(hidden, m.kv_lora_rank + m.qk_rope_head_dim, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank)
        self.kv_b_proj = linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = linear(h * m.v_head_dim, hidden, bias=config.o_bias)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache | None) -> torch.Tensor:
        """``x [T, D]`` -> ``[T, D]``."""
        c, m = self.config, self.config.mla
        if m.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(-1, c.num_heads, m.qk_head_dim).split([m.qk_nope_head_dim, m.qk_rope_head_dim], -1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent)  # [T, r]
        rope = _rope(batch, m.qk_rope_head_dim, c.rope_theta, x.dtype, c.rope_interleave, c.rope_scaling)
        q_rot = apply_rope(q_rot, rope)
        k_rot = apply_rope(k_rot[:, None, :], rope)[:, 0]  # [T, R]

        def context(part: ForwardBatch, latents: torch.Tensor, rot_keys: torch.Tensor):
            """Keys and values decompressed from ``latents [B, L, r]``, ``rot_keys [B, L, R]``."""
            kv = self.kv_b_proj(latents).view(*latents.shape[:2], c.num_heads, -1)
            k_nope, values = kv.split([m.qk_nope_head_dim, m.v_head_dim], -1)
            return torch.cat((k_nope, rot_keys[:, :, None, :].expand(-1, -1, c.num_heads, -1)), -1), values

        q = torch.cat((q_nope, q_rot), -1)
        scale = softmax_scale(m.qk_head_dim, c.rope_scaling)
        if cache is None:
            out = _attend(batch, q, *context(batch, _pad(batch, latent), _pad(batch, k_rot)), batch.max_new, scale)
        else:
            _store(batch, latent, k_rot, cache, self.layer)
            out = _attend_parts(batch, q, lambda part: context(part, *_load(part, cache, self.layer, x.dtype)),
                                scale)
        return self.o_proj(out.reshape(x.shape[0], -1))
