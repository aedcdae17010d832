"""Typed reads of a Hugging Face ``config.json``: every bad field names itself."""

from __future__ import annotations

from typing import Any

from raymoe.workers.model.errors import ConfigFieldError, UnsupportedModelError
from raymoe.workers.model.rope import ROPE_TYPES, RopeScaling

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

    def _rope_params(self) -> dict:
        params = self.data.get("rope_parameters") or self.data.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ConfigFieldError(self.path, "rope_parameters", params, "a JSON object")
        return params

    def rope_theta(self) -> float:
        """``rope_parameters.rope_theta`` (transformers 5) or the older top-level fields."""
        params = self._rope_params()
        theta = params.get("rope_theta", self.data.get("rope_theta", 10000.0))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ConfigFieldError(self.path, "rope_parameters.rope_theta", theta, "a positive number")
        return float(theta)

    def partial_rotary_factor(self) -> float:
        """The share of each head's dims RoPE rotates (GLM-4.5: 0.5): ``rope_parameters.
        partial_rotary_factor`` (transformers 5) or the older top-level field; 1.0 if absent."""
        params = self._rope_params()
        factor = params.get("partial_rotary_factor", self.data.get("partial_rotary_factor", 1.0))
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise ConfigFieldError(self.path, "rope_parameters.partial_rotary_factor", factor, "a number in (0, 1]")
        return float(factor)

    def rope_scaling(self) -> RopeScaling | None:
        """``rope_parameters`` (or the older ``rope_scaling``) beyond ``rope_theta``: None
        for default RoPE; linear, llama3 and yarn frequencies; any other type refused."""
        params = self._rope_params()
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in ("default", None):
            return None
        if rope_type not in ROPE_TYPES:
            later = " (its frequencies change with the sequence length; not implemented)" \
                if rope_type in ("dynamic", "longrope") else ""
            raise UnsupportedModelError(self.path, "rope_parameters.rope_type", rope_type,
                                        f"one of {list(ROPE_TYPES)}{later}")
        field = "rope_parameters"

        def number(key: str, default: Any = _MISSING, positive: bool = True) -> Any:
            value = params.get(key)
            if value is None:
                if default is _MISSING:
                    raise ConfigFieldError(self.path, f"{field}.{key}", None,
                                           f"a number (rope_type {rope_type!r} needs it)")
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
                raise ConfigFieldError(self.path, f"{field}.{key}", value, "a positive number")
            return value

        factor = float(number("factor"))
        original = None
        if rope_type in ("llama3", "yarn"):
            original = number("original_max_position_embeddings")
            if not isinstance(original, int):
                raise ConfigFieldError(self.path, f"{field}.original_max_position_embeddings", original, "an integer")
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ConfigFieldError(self.path, f"{field}.truncate", truncate, "true or false")
        scaling = RopeScaling(
            rope_type, factor, original,
            low_freq_factor=float(number("low_freq_factor", 1.0)),
            high_freq_factor=float(number("high_freq_factor", 4.0)),
            beta_fast=float(number("beta_fast", 32.0)), beta_slow=float(number("beta_slow", 1.0)),
            mscale=number("mscale", None, positive=False), mscale_all_dim=number("mscale_all_dim", None, positive=False),
            attention_factor=number("attention_factor", None), truncate=truncate,
        )
        if rope_type == "llama3" and scaling.low_freq_factor >= scaling.high_freq_factor:
            raise ConfigFieldError(self.path, f"{field}.high_freq_factor", scaling.high_freq_factor,
                                   f"a number above low_freq_factor={scaling.low_freq_factor}")
        return scaling

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
            rope_scaling=self.rope_scaling(),
            max_position_embeddings=self.int("max_position_embeddings", 4096),
            tie_word_embeddings=self.bool("tie_word_embeddings", False),
            bos_token_id=bos if isinstance(bos, int) else None,
            eos_token_ids=self.eos_token_ids(),
        )

    def quantization(self):
        """The checkpoint's quantization: None, or block-quantized FP8 (loaded by
        dequantizing, ``workers/model/quantization.py``). Every other kind (AWQ, GPTQ,
        bitsandbytes, compressed-tensors, per-tensor FP8, ...) is refused naming its field:
        raymoe would read its packed weights as plain ones and drop the scales."""
        from raymoe.workers.model.quantization import parse_quantization

        return parse_quantization(self.data, self.path)

    def no_sliding_window(self) -> None:
        """Sliding-window attention is not implemented: refuse checkpoints that use it."""
        window = self.data.get("sliding_window")
        used = self.data.get("use_sliding_window", window is not None)
        if used and window:
            raise UnsupportedModelError(
                self.path, "sliding_window", window, "null (sliding-window attention is not implemented)"
            )
