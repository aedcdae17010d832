"""FP8 block-quantized checkpoints, dequantized on load.

The format DeepSeek-V3/R1 and Qwen3-*-FP8 ship (``quantization_config`` with
``quant_method: fp8`` and ``weight_block_size: [bo, bi]``, usually [128, 128]): each
quantized linear weight ``W [out, in]`` is stored as ``float8_e4m3fn`` next to
``<name>_scale_inv`` ``float32 [ceil(out / bo), ceil(in / bi)]``, and the weight is

    W[r, c] = W_fp8[r, c] * scale_inv[r // bo, c // bi]

(the name is DeepSeek's: the inverse of the quantization scale, i.e. the multiplier).
Embeddings, norms, routers, the LM head and anything in ``modules_to_not_convert`` stay
in bfloat16 in such checkpoints and load as they are.

raymoe dequantizes every such weight when it is read, to the serving dtype (the
portable path: the same kernels on every device; an expert rank reads only its slots,
so it dequantizes only those). Keeping the weights in FP8 and running a block-scaled
GEMM (DeepGEMM, or ``torch._scaled_mm`` on Hopper) is not built: the weights take the
serving dtype's memory. Activations are not quantized, so ``activation_scheme: dynamic``
(per-token activation scales computed at run time) loads exactly; ``static`` (calibrated
``input_scale`` tensors) is refused, as are other ``quant_method``s, naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raymoe.workers.model.errors import ConfigFieldError, UnsupportedModelError

SCALE_SUFFIX = "_scale_inv"  # "<x>.weight" -> "<x>.weight_scale_inv"
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}  # safetensors header name -> torch dtype
FORMATS = ("e4m3",)


@dataclass(frozen=True)
class Fp8BlockQuant:
    """What a checkpoint's ``quantization_config`` says, once checked."""

    block: tuple[int, int]  # (rows, columns) of W per scale
    activation_scheme: str = "dynamic"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The ``scale_inv`` shape of a weight of ``shape [out, in]``."""
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])


def parse_quantization(data: dict, path: str) -> Fp8BlockQuant | None:
    """The checkpoint's quantization (None: unquantized). Raises ``UnsupportedModelError``
    for a method or variant raymoe does not load, ``ConfigFieldError`` for a bad field;
    each names the field."""
    for field in ("quantization_config", "compression_config"):  # the second: older compressed-tensors
        quant = data.get(field)
        if quant is None:
            continue
        if field == "compression_config" or not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
            named = isinstance(quant, dict) and "quant_method" in quant
            raise UnsupportedModelError(
                path, f"{field}.quant_method" if named else field, quant["quant_method"] if named else quant,
                "no quantization, or quant_method fp8 with weight_block_size (DeepSeek-V3 / Qwen3-FP8 style, "
                "dequantized on load): raymoe loads unquantized weights otherwise; use the original checkpoint",
            )
        block = quant.get("weight_block_size")
        if block is None:
            raise UnsupportedModelError(path, "quantization_config.weight_block_size", None,
                                        "a [rows, columns] block size: per-tensor FP8 (weight_scale) is not "
                                        "supported, only block-quantized FP8 (weight_scale_inv)")
        if not (isinstance(block, list) and len(block) == 2 and
                all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
            raise ConfigFieldError(path, "quantization_config.weight_block_size", block,
                                   "two positive integers [rows, columns], e.g. [128, 128]")
        scheme = quant.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise UnsupportedModelError(path, "quantization_config.activation_scheme", scheme,
                                        "dynamic: raymoe dequantizes the weights and does not quantize "
                                        "activations, so calibrated static input scales would be dropped")
        fmt = quant.get("fmt", "e4m3")
        if fmt not in FORMATS:
            raise UnsupportedModelError(path, "quantization_config.fmt", fmt, f"one of {list(FORMATS)}")
        return Fp8BlockQuant((block[0], block[1]), scheme)
    return None


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """``weight [out, in]`` (float8) times its block's ``scale_inv`` -> ``dtype [out, in]``,
    computed in float32."""
    out, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for tests and tools: ``weight [out, in]`` -> (``float8_e4m3fn [out, in]``,
    ``scale_inv float32 [ceil(out/bo), ceil(in/bi)]``), each block scaled so that its
    largest magnitude maps to the format's largest value (448), as DeepSeek's tools do."""
    out, cols = weight.shape
    rows_b, cols_b = math.ceil(out / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(rows_b * block[0], cols_b * block[1], dtype=torch.float32)
    padded[:out, :cols] = weight.float()
    tiles = padded.view(rows_b, block[0], cols_b, block[1])
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [rows_b, cols_b]
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn).view_as(padded)[:out, :cols]
    return q.contiguous(), scale_inv
