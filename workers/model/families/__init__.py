"""Model families: each module turns a ``config.json`` into a ``ModelConfig`` and names
its checkpoint tensors. One module per family; this file is the registry."""

from __future__ import annotations

from types import ModuleType

from raymoe.workers.model.config import ModelConfig
from raymoe.workers.model.errors import ConfigFieldError, UnsupportedModelError
from raymoe.workers.model.families import deepseek, glm4_moe, mixtral, olmoe, qwen_moe
from raymoe.workers.model.families.raw_config import RawConfig

_FAMILIES: tuple[ModuleType, ...] = (mixtral, qwen_moe, olmoe, deepseek, glm4_moe)
FAMILY_BY_MODEL_TYPE: dict[str, ModuleType] = {t: f for f in _FAMILIES for t in f.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILY_BY_MODEL_TYPE))


def family_of(model_type: str, path: str = "config.json") -> ModuleType:
    if model_type not in FAMILY_BY_MODEL_TYPE:
        raise UnsupportedModelError(path, "model_type", model_type, f"one of {list(SUPPORTED_MODEL_TYPES)}")
    return FAMILY_BY_MODEL_TYPE[model_type]


def parse_config(data: dict, path: str = "config.json", moge_groups: int | None = None) -> ModelConfig:
    """``config.json`` contents -> ``ModelConfig``.

    ``moge_groups`` switches on MoGE routing for any family (it overrides the raymoe
    extension field ``moge_num_groups`` of ``config.json``).
    """
    raw = RawConfig(data, path)
    raw.quantization()  # refuses what raymoe cannot load; the checkpoint reads the rest
    family = family_of(raw.get("model_type"), path)
    config = family.parse(raw)
    groups = moge_groups if moge_groups is not None else raw.int("moge_num_groups", 0, minimum=0)
    if groups:
        config = config.with_moge(groups)
    validate(config, path)
    return config


def validate(config: ModelConfig, path: str) -> None:
    """Cross-field checks that a single field's parser cannot make."""
    router = config.router
    if router.top_k > router.num_experts:
        raise ConfigFieldError(path, "num_experts_per_tok", router.top_k, f"at most the {router.num_experts} experts")
    groups = router.moge_groups
    if groups:
        if router.num_experts % groups:
            raise ConfigFieldError(path, "moge_num_groups", groups, f"a divisor of the {router.num_experts} experts")
        if router.top_k % groups:
            raise ConfigFieldError(
                path, "moge_num_groups", groups, f"a divisor of num_experts_per_tok={router.top_k} (K/G experts per group)"
            )
    if config.attention == "gqa" and config.rope_dim % 2:
        raise ConfigFieldError(path, "head_dim", config.head_dim, "an even number (RoPE rotates pairs)")


def checkpoint_key(config: ModelConfig, key: str) -> str:
    """Our parameter name -> the checkpoint tensor name (they differ only in the MoE block)."""
    family = family_of(config.family)
    parts = key.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[3] == "mlp":
        layer = int(parts[2])
        if config.moe_layers[layer]:
            parts[3] = family.MOE_PREFIX
            if len(parts) > 4 and parts[4] == "shared_expert":
                parts[4] = family.SHARED_NAME
    return ".".join(parts)


def expert_keys(config: ModelConfig, layer: int, expert: int) -> tuple[str, str, str]:
    """Checkpoint names of expert ``expert`` of decoder layer ``layer``: (gate, up, down)."""
    family = family_of(config.family)
    prefix = f"model.layers.{layer}.{family.MOE_PREFIX}.experts.{expert}"
    return tuple(f"{prefix}.{name}.weight" for name in family.EXPERT_PROJ)
