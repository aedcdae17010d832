"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention, shared experts, dense
first layers (``first_k_dense_replace``), group-limited top-k.

V2: softmax scores; ``topk_method`` "greedy" or "group_limited_greedy" (group score =
max); weights renormalised when ``norm_topk_prob`` else scaled by
``routed_scaling_factor``. V3: sigmoid scores, ``e_score_correction_bias`` added for
the choice only, group score = sum of the group's two best, weights renormalised (if
``norm_topk_prob``) and then scaled.
"""

from __future__ import annotations

from raymoe.workers.model.config import MLAConfig, ModelConfig, RouterConfig
from raymoe.workers.model.errors import ConfigFieldError
from raymoe.workers.model.families.raw_config import RawConfig

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
MOE_PREFIX = "mlp"
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
SHARED_NAME = "shared_experts"
EXPERTS_FIELD = "n_routed_experts"


def _router(raw: RawConfig, v3: bool) -> RouterConfig:
    experts = raw.int("n_routed_experts")
    top_k = raw.int("num_experts_per_tok")
    if v3:
        method = raw.choice("topk_method", ("noaux_tc",), "noaux_tc")
    else:
        method = raw.choice("topk_method", ("greedy", "group_limited_greedy"), "greedy")
    grouped = method in ("group_limited_greedy", "noaux_tc")
    n_group = raw.int("n_group", 1) if grouped else 1
    topk_group = raw.int("topk_group", 1) if grouped else 1
    if experts % n_group:
        raise ConfigFieldError(raw.path, "n_group", n_group, f"a divisor of n_routed_experts={experts}")
    if topk_group > n_group:
        raise ConfigFieldError(raw.path, "topk_group", topk_group, f"at most n_group={n_group}")
    return RouterConfig(
        num_experts=experts,
        top_k=top_k,
        scoring="sigmoid" if v3 else "softmax",
        norm_topk_prob=raw.bool("norm_topk_prob", v3),
        routed_scaling_factor=raw.float("routed_scaling_factor", 1.0),
        n_group=n_group,
        topk_group=topk_group,
        group_score="top2_sum" if v3 else "max",
        correction_bias=v3,
        scale_only_unnormalised=not v3,
    )


def parse(raw: RawConfig) -> ModelConfig:
    v3 = raw.get("model_type") == "deepseek_v3"
    fields = raw.decoder_fields()
    mla = MLAConfig(
        q_lora_rank=raw.int("q_lora_rank", None),
        kv_lora_rank=raw.int("kv_lora_rank"),
        qk_nope_head_dim=raw.int("qk_nope_head_dim"),
        qk_rope_head_dim=raw.int("qk_rope_head_dim"),
        v_head_dim=raw.int("v_head_dim"),
    )
    if mla.qk_rope_head_dim % 2:
        raise ConfigFieldError(raw.path, "qk_rope_head_dim", mla.qk_rope_head_dim, "an even number")
    first_dense = raw.int("first_k_dense_replace", 0, minimum=0)
    freq = raw.int("moe_layer_freq", 1)
    layers = fields["num_layers"]
    bias = raw.bool("attention_bias", False)
    return ModelConfig(
        family=raw.get("model_type"),
        intermediate_size=raw.int("intermediate_size"),
        moe_intermediate_size=raw.int("moe_intermediate_size"),
        moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(layers)),
        router=_router(raw, v3),
        attention="mla",
        mla=mla,
        rope_interleave=raw.bool("rope_interleave", True) if v3 else True,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=raw.bool("mlp_bias", False),
        shared_expert_intermediate_size=raw.int("moe_intermediate_size")
        * raw.int("n_shared_experts", 0, minimum=0),
        **fields,
    )
