"""OLMoE: softmax top-k without renormalisation (by default), RMSNorm over the whole
query and key projections, optional ``clip_qkv``. Every layer is MoE."""

from __future__ import annotations

from raymoe.workers.model.config import ModelConfig, RouterConfig
from raymoe.workers.model.families.raw_config import RawConfig

MODEL_TYPES = ("olmoe",)
MOE_PREFIX = "mlp"
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
SHARED_NAME = ""
EXPERTS_FIELD = "num_experts"


def parse(raw: RawConfig) -> ModelConfig:
    fields = raw.decoder_fields()
    router = RouterConfig(
        num_experts=raw.int("num_experts", raw.data.get("num_local_experts")),
        top_k=raw.int("num_experts_per_tok"),
        scoring="softmax",
        norm_topk_prob=raw.bool("norm_topk_prob", False),
    )
    clip = raw.data.get("clip_qkv")
    bias = raw.bool("attention_bias", False)
    width = raw.int("intermediate_size")
    return ModelConfig(
        family="olmoe",
        intermediate_size=width,
        moe_intermediate_size=width,
        moe_layers=(True,) * fields["num_layers"],
        router=router,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=None if clip is None else raw.float("clip_qkv"),
        **fields,
    )
