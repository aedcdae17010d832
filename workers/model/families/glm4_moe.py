"""GLM-4.5 / GLM-4.6 MoE (``glm4_moe``).

DeepSeek-V3's router (sigmoid scores, ``e_score_correction_bias`` for the choice only,
group-limited top-k by each group's two best, renormalised when ``norm_topk_prob``, then
scaled by ``routed_scaling_factor``), shared experts, dense first layers
(``first_k_dense_replace``); GQA attention with q/k/v biases (``attention_bias``; none on
the output projection), per-head q/k RMSNorm when ``use_qk_norm``, and RoPE over the first
``partial_rotary_factor`` of each head's dims (0.5 in GLM-4.5), pairs (x_i, x_{i+R/2}).
"""

from __future__ import annotations

from raymoe.workers.model.config import ModelConfig
from raymoe.workers.model.families.deepseek import _router
from raymoe.workers.model.families.raw_config import RawConfig

MODEL_TYPES = ("glm4_moe",)
MOE_PREFIX = "mlp"
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
SHARED_NAME = "shared_experts"
EXPERTS_FIELD = "n_routed_experts"


def parse(raw: RawConfig) -> ModelConfig:
    fields = raw.decoder_fields()
    first_dense = raw.int("first_k_dense_replace", 1, minimum=0)
    return ModelConfig(
        family="glm4_moe",
        intermediate_size=raw.int("intermediate_size"),
        moe_intermediate_size=raw.int("moe_intermediate_size"),
        moe_layers=tuple(i >= first_dense for i in range(fields["num_layers"])),
        router=_router(raw, v3=True),
        qkv_bias=raw.bool("attention_bias", False),
        qk_norm="head" if raw.bool("use_qk_norm", False) else "none",
        partial_rotary_factor=raw.partial_rotary_factor(),
        shared_expert_intermediate_size=raw.int("moe_intermediate_size") * raw.int("n_shared_experts", 1, minimum=0),
        **fields,
    )
