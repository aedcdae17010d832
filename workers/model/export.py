"""Save a raymoe model as a Hugging Face checkpoint: the inverse of ``checkpoint.load_model``.

Writes ``config.json`` in the family's own format (transformers' ``AutoModelForCausalLM``
loads it) and one ``model.safetensors`` with the family's tensor names: routed experts one
tensor per projection and expert (``...experts.{e}.w1.weight`` for Mixtral), as checkpoints
on the hub store them.

Shapes: E = routed experts of a layer, I = expert width, D = hidden.
Families: mixtral, qwen2_moe, qwen3_moe, olmoe. DeepSeek (MLA, group-limited routing) is
not written yet and raises ``UnsupportedModelError``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from raymoe.workers.model.config import ModelConfig
from raymoe.workers.model.decoder import MoEForCausalLM
from raymoe.workers.model.errors import CheckpointError, UnsupportedModelError
from raymoe.workers.model.families import checkpoint_key, expert_keys, family_of

WEIGHTS_FILE = "model.safetensors"
_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


def _common_fields(config: ModelConfig) -> dict:
    """``config.json`` fields every family reads through ``RawConfig.decoder_fields``."""
    eos = list(config.eos_token_ids)
    return {
        "architectures": [_ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": _rope_parameters(config),
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "num_experts_per_tok": config.top_k,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def _mixtral_fields(config: ModelConfig) -> dict:
    return {"intermediate_size": config.moe_intermediate_size, "num_local_experts": config.num_experts,
            "sliding_window": None}


def _olmoe_fields(config: ModelConfig) -> dict:
    return {"intermediate_size": config.moe_intermediate_size, "num_experts": config.num_experts,
            "norm_topk_prob": config.router.norm_topk_prob, "clip_qkv": config.clip_qkv,
            "attention_bias": config.qkv_bias}


def _qwen_fields(config: ModelConfig) -> dict:
    """Qwen2-MoE and Qwen3-MoE: dense layers are listed in ``mlp_only_layers``."""
    fields = {
        "intermediate_size": config.intermediate_size,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_experts": config.num_experts,
        "norm_topk_prob": config.router.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [l for l, is_moe in enumerate(config.moe_layers) if not is_moe],
        "use_sliding_window": False,
        "sliding_window": None,
    }
    if config.family == "qwen2_moe":
        fields.update(qkv_bias=config.qkv_bias, shared_expert_intermediate_size=config.shared_expert_intermediate_size)
    else:
        fields.update(attention_bias=config.qkv_bias)
    return fields


_FAMILY_FIELDS: dict[str, Callable[[ModelConfig], dict]] = {
    "mixtral": _mixtral_fields,
    "olmoe": _olmoe_fields,
    "qwen2_moe": _qwen_fields,
    "qwen3_moe": _qwen_fields,
}


def hf_config(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """``ModelConfig`` -> the contents of a Hugging Face ``config.json`` for its family.

    ``parse_config(hf_config(c)) == c`` for every family this module writes.
    """
    family_of(config.family)  # an unknown family raises UnsupportedModelError here
    if config.family not in _FAMILY_FIELDS:
        raise UnsupportedModelError("config.json", "model_type", config.family,
                                    f"one of {sorted(_FAMILY_FIELDS)} (export of this family is not written yet)")
    data = {**_common_fields(config), **_FAMILY_FIELDS[config.family](config)}
    if config.router.moge_groups:
        data["moge_num_groups"] = config.router.moge_groups  # raymoe extension field
    data["dtype"] = str(dtype).removeprefix("torch.")
    return data


def hf_state_dict(model: MoEForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our parameters under the family's checkpoint names, each a contiguous copy in ``dtype``.

    Stacked experts ``gate_up [E, 2I, D]`` and ``down [E, D, I]`` become per-expert
    ``gate [I, D]``, ``up [I, D]`` and ``down [D, I]`` tensors.
    """
    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if ".mlp.experts." in name or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        tensors[checkpoint_key(config, name)] = value.detach().to(dtype).contiguous().clone()
    for layer in config.moe_layer_ids:
        experts = model.model.layers[layer].mlp.experts
        if experts is None or experts.num_experts != config.num_experts:
            raise CheckpointError("<model>", f"layer {layer} does not hold all {config.num_experts} experts",
                                  "save a model built with with_experts=True")
        width = config.moe_intermediate_size
        for expert in range(config.num_experts):
            gate_key, up_key, down_key = expert_keys(config, layer, expert)
            gate_up = experts.gate_up[expert].detach().to(dtype)  # [2I, D]
            tensors[gate_key] = gate_up[:width].contiguous().clone()
            tensors[up_key] = gate_up[width:].contiguous().clone()
            tensors[down_key] = experts.down[expert].detach().to(dtype).contiguous().clone()
    return tensors


def save_checkpoint(model: MoEForCausalLM, path: str | Path, extra_config: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into directory ``path``.

    ``dtype`` defaults to the model's; ``extra_config`` entries are added to (and override)
    ``config.json`` (e.g. ``initializer_range``, ``router_aux_loss_coef``). Returns ``path``.
    ``load_model(path)`` gives back the same logits; transformers loads it too.
    """
    path = Path(path)
    dtype = dtype or next(model.parameters()).dtype
    data = {**hf_config(model.config, dtype), **(extra_config or {})}
    tensors = hf_state_dict(model, dtype)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def _rope_parameters(config: ModelConfig) -> dict:
    """``rope_parameters`` as transformers 5 writes it."""
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    fields = {k: v for k, v in dataclasses.asdict(config.rope_scaling).items() if v is not None}
    return {**fields, "rope_theta": config.rope_theta}
