"""Typed reads of a Hugging Face ``config.json``: every bad field names itself."""

from __future__ import annotations

from typing import Any

from raymoe.workers.model.errors import ConfigFieldError, UnsupportedModelError

_MISSING = object()


class RawConfig:
    """A parsed ``config.json`` plus the path it came from, for error messages."""

    def __init__(self, data: dict, path: str):
        if not isinstance(data, dict):
            raise ConfigFieldError(path, "<root>", type(data).__name__, "a JSON object")
        self.data, self.path = data, str(path)

    def get(self, field: str, default: Any = _MISSING) -> Any:
        if field in self.data and self.data[field] is not None:
            return self.data[field]
        if default is _MISSING:
            raise ConfigFieldError(self.path, field, None, "a value (the field is required)")
        return default

    def int(self, field: str, default: Any = _MISSING, minimum: int = 1) -> int:
        value = self.get(field, default)
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigFieldError(self.path, field, value, f"an integer >= {minimum}")
        return value

    def float(self, field: str, default: Any = _MISSING) -> float:
        value = self.get(field, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigFieldError(self.path, field, value, "a number")
        return float(value)

    def bool(self, field: str, default: Any = _MISSING) -> bool:
        value = self.get(field, default)
        if not isinstance(value, bool):
            raise ConfigFieldError(self.path, field, value, "true or false")
        return value

    def choice(self, field: str, choices: tuple, default: Any = _MISSING) -> Any:
        value = self.get(field, default)
        if value not in choices:
            raise ConfigFieldError(self.path, field, value, f"one of {list(choices)}")
        return value

    def rope_theta(self) -> float:
        """``rope_parameters.rope_theta`` (transformers 5) or the older top-level fields."""
        params = self.data.get("rope_parameters") or self.data.get("rope_scaling") or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedModelError(
                self.path, "rope_parameters.rope_type", rope_type,
                "'default' (scaled RoPE such as yarn is not implemented yet)",
            )
        theta = params.get("rope_theta", self.data.get("rope_theta", 10000.0))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ConfigFieldError(self.path, "rope_parameters.rope_theta", theta, "a positive number")
        return float(theta)

    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.data.get("eos_token_id")
        if eos is None:
            return ()
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigFieldError(self.path, "eos_token_id", eos, "a token id or a list of token ids")
        return tuple(ids)

    def hidden_act(self) -> None:
        act = self.data.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(self.path, "hidden_act", act, "'silu'")

    def decoder_fields(self) -> dict:
        """Fields every family shares, as keyword arguments of ``ModelConfig``."""
        self.hidden_act()
        hidden = self.int("hidden_size")
        heads = self.int("num_attention_heads")
        kv_heads = self.int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ConfigFieldError(
                self.path, "num_key_value_heads", kv_heads,
                f"a divisor of num_attention_heads={heads}",
            )
        head_dim = self.int("head_dim", hidden // heads)
        bos = self.data.get("bos_token_id")
        return dict(
            vocab_size=self.int("vocab_size"),
            hidden_size=hidden,
            num_layers=self.int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=self.float("rms_norm_eps", 1e-6),
            rope_theta=self.rope_theta(),
            max_position_embeddings=self.int("max_position_embeddings", 4096),
            tie_word_embeddings=self.bool("tie_word_embeddings", False),
            bos_token_id=bos if isinstance(bos, int) else None,
            eos_token_ids=self.eos_token_ids(),
        )

    def no_quantization(self) -> None:
        """Refuse quantized checkpoints (FP8, AWQ, GPTQ, bitsandbytes, compressed-tensors,
        ...): raymoe would read their packed weights as plain ones and drop the scales."""
        for field in ("quantization_config", "compression_config"):  # the second: older compressed-tensors
            quant = self.data.get(field)
            if quant is None:
                continue
            named = isinstance(quant, dict) and "quant_method" in quant
            raise UnsupportedModelError(
                self.path, f"{field}.quant_method" if named else field, quant["quant_method"] if named else quant,
                f"no {field}: raymoe loads unquantized (float32, bfloat16 or float16) weights only; use the "
                "original unquantized checkpoint",
            )

    def no_sliding_window(self) -> None:
        """Sliding-window attention is not implemented: refuse checkpoints that use it."""
        window = self.data.get("sliding_window")
        used = self.data.get("use_sliding_window", window is not None)
        if used and window:
            raise UnsupportedModelError(
                self.path, "sliding_window", window, "null (sliding-window attention is not implemented)"
            )
