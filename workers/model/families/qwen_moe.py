"""Qwen2-MoE and Qwen3-MoE.

Softmax routing, optional renormalisation (``norm_topk_prob``), dense MLP layers where
``mlp_only_layers`` says so or ``(l + 1) % decoder_sparse_step != 0``. Qwen2-MoE adds a
shared expert scaled by ``sigmoid(shared_expert_gate(x))`` and q/k/v biases; Qwen3-MoE
has RMSNorm on every query and key head.
"""

from __future__ import annotations

from raymoe.workers.model.config import ModelConfig, RouterConfig
from raymoe.workers.model.errors import ConfigFieldError
from raymoe.workers.model.families.raw_config import RawConfig

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
MOE_PREFIX = "mlp"
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
SHARED_NAME = "shared_expert"
EXPERTS_FIELD = "num_experts"


def _moe_layers(raw: RawConfig, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    step = raw.int("decoder_sparse_step", 1)
    only_mlp = raw.get("mlp_only_layers", [])
    if not isinstance(only_mlp, list) or not all(isinstance(i, int) for i in only_mlp):
        raise ConfigFieldError(raw.path, "mlp_only_layers", only_mlp, "a list of layer indices")
    bad = [i for i in only_mlp if not 0 <= i < num_layers]
    if bad:
        raise ConfigFieldError(raw.path, "mlp_only_layers", only_mlp, f"indices in [0, {num_layers})")
    return tuple(
        num_experts > 0 and i not in only_mlp and (i + 1) % step == 0 for i in range(num_layers)
    )


def parse(raw: RawConfig) -> ModelConfig:
    raw.no_sliding_window()
    model_type = raw.get("model_type")
    fields = raw.decoder_fields()
    # transformers 5 writes num_local_experts for qwen3_moe; older configs say num_experts.
    experts = raw.int("num_experts", raw.data.get("num_local_experts"))
    router = RouterConfig(
        num_experts=experts,
        top_k=raw.int("num_experts_per_tok"),
        scoring="softmax",
        norm_topk_prob=raw.bool("norm_topk_prob", False),
    )
    if model_type == "qwen2_moe":
        family = dict(
            qkv_bias=raw.bool("qkv_bias", True),
            shared_expert_intermediate_size=raw.int("shared_expert_intermediate_size", 0, minimum=0),
            shared_expert_gate=True,
        )
    else:
        bias = raw.bool("attention_bias", False)
        family = dict(qkv_bias=bias, o_bias=bias, qk_norm="head")
    return ModelConfig(
        family=model_type,
        intermediate_size=raw.int("intermediate_size"),
        moe_intermediate_size=raw.int("moe_intermediate_size"),
        moe_layers=_moe_layers(raw, fields["num_layers"], experts),
        router=router,
        **family,
        **fields,
    )
