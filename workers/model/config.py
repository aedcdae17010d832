"""One model config for every family: what the pure-torch decoder needs, nothing else.

Family parsers in ``workers/model/families/`` turn a Hugging Face ``config.json`` into
a :class:`ModelConfig`; the rest of raymoe only ever sees this class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from raymoe.workers.model.rope import RopeScaling


@dataclass(frozen=True)
class RouterConfig:
    """How a MoE layer picks its experts.

    scoring:         "softmax" (Mixtral, Qwen, OLMoE, DeepSeek-V2) or "sigmoid" (DeepSeek-V3).
    norm_topk_prob:  renormalise the chosen weights to sum to 1.
    routed_scaling_factor: multiplies the final weights (DeepSeek).
    n_group, topk_group, group_score: group-limited top-k (DeepSeek): experts are split into
        ``n_group`` contiguous groups, a group's score is its max ("max", V2) or the sum of its
        two best ("top2_sum", V3); only the ``topk_group`` best groups compete.
    correction_bias: V3 ``e_score_correction_bias`` is added to scores for the choice only.
    moge_groups:     MoGE (Pangu Pro MoE): experts in G contiguous groups, each token takes
        top ``top_k / G`` inside every group. 0 means off. Applies to any family.
    """

    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    correction_bias: bool = False
    moge_groups: int = 0
    # DeepSeek-V2 semantics: weights are either renormalised or scaled, never both.
    scale_only_unnormalised: bool = False


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE language model.

    Layer ``l`` is a MoE layer when ``moe_layers[l]`` is True, otherwise a dense gated MLP
    of width ``intermediate_size``.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers only)
    moe_intermediate_size: int  # one routed expert's width
    moe_layers: tuple[bool, ...]
    router: RouterConfig
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_interleave: bool = False  # DeepSeek: rotary pairs are (x0, x1), (x2, x3), ...
    rope_scaling: RopeScaling | None = None  # long-context frequencies (workers/model/rope.py); None: default
    partial_rotary_factor: float = 1.0  # GQA: RoPE rotates the first head_dim * this dims of each head (GLM-4.5: 0.5)
    max_position_embeddings: int = 4096
    attention: Literal["gqa", "mla"] = "gqa"
    mla: MLAConfig | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"  # Qwen3: per head; OLMoE: whole projection
    clip_qkv: float | None = None
    mlp_bias: bool = False
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(D, 1)) scales the shared expert
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Decoder layer index of every MoE layer, in model order."""
        return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

    @property
    def rope_dim(self) -> int:
        """Dims of each query / key head that RoPE rotates."""
        return self.mla.qk_rope_head_dim if self.mla is not None else int(self.head_dim * self.partial_rotary_factor)

    def with_moge(self, groups: int) -> "ModelConfig":
        """The same model with MoGE routing over ``groups`` expert groups."""
        return replace(self, router=replace(self.router, moge_groups=groups))
