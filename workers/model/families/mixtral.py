"""Mixtral: softmax over all experts, top-k, renormalise. Every layer is MoE."""

from __future__ import annotations

from raymoe.workers.model.config import ModelConfig, RouterConfig
from raymoe.workers.model.families.raw_config import RawConfig

MODEL_TYPES = ("mixtral",)
MOE_PREFIX = "block_sparse_moe"
EXPERT_PROJ = ("w1", "w3", "w2")  # gate, up, down
SHARED_NAME = ""
EXPERTS_FIELD = "num_local_experts"


def parse(raw: RawConfig) -> ModelConfig:
    raw.no_sliding_window()
    fields = raw.decoder_fields()
    experts = raw.int("num_local_experts")
    router = RouterConfig(
        num_experts=experts,
        top_k=raw.int("num_experts_per_tok"),
        scoring="softmax",
        norm_topk_prob=True,
    )
    width = raw.int("intermediate_size")
    return ModelConfig(
        family="mixtral",
        intermediate_size=width,
        moe_intermediate_size=width,
        moe_layers=(True,) * fields["num_layers"],
        router=router,
        **fields,
    )
