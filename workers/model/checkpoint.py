"""Load a local Hugging Face-format checkpoint: ``config.json``, ``*.safetensors``
(one file, or shards listed by ``model.safetensors.index.json``), ``tokenizer.json``.

Every problem is reported as a typed error naming the file or field before any weight
is used. Routed experts can be loaded alone (an expert rank reads only its slots). FP8
block-quantized weights are dequantized as they are read (``quantization.py``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from raymoe.workers.model.config import ModelConfig
from raymoe.workers.model.decoder import MoEForCausalLM
from raymoe.workers.model.errors import (
    CheckpointError,
    ConfigFieldError,
    MissingWeightError,
    NonFiniteWeightError,
    QuantizedWeightError,
    WeightShapeError,
)
from raymoe.workers.model.families import checkpoint_key, expert_keys, family_of, parse_config
from raymoe.workers.model.families.raw_config import RawConfig
from raymoe.workers.model.quantization import FP8_DTYPES, SCALE_SUFFIX, dequantize

INDEX_FILE = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.[a-z_]+\.experts\.(\d+)\.")
# Tensors only quantized checkpoints hold: FP8 block scales (weight_scale_inv), per-tensor
# scales (weight_scale, input_scale, k_scale), GPTQ / AWQ packing (qweight, qzeros,
# scales, g_idx), compressed-tensors (weight_packed, weight_zero_point, weight_shape) and
# bitsandbytes state (absmax, quant_map, quant_state.*, SCB).
_QUANTIZED_KEY = re.compile(r"(_scale|_scale_inv|_scale_2|\.(qweight|qzeros|scales|g_idx|weight_packed|"
                            r"weight_zero_point|weight_shape|absmax|quant_map|SCB))$|\.quant_state\.")
UNQUANTIZED = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(path, f"{what} is missing", "point --model at a Hugging Face-format model directory")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"{what} is not valid JSON ({exc})", "restore the file") from None


class Checkpoint:
    """A checkpoint directory; tensors are read lazily, shard by shard."""

    def __init__(self, path: str | Path, moge_groups: int | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(self.path, "is not a directory", "pass the directory that holds config.json")
        config_path = self.path / "config.json"
        self.raw_config = _read_json(config_path, "config.json")
        self.config: ModelConfig = parse_config(self.raw_config, str(config_path), moge_groups)
        self.quantization = RawConfig(self.raw_config, str(config_path)).quantization()  # None or FP8 blocks
        self._handles: dict[str, object] = {}
        self.weight_map = self._weight_map()  # tensor name -> shard file name
        self._check_unquantized()
        self._check_expert_count()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = _read_json(index, INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(index, "has no 'weight_map' object", "regenerate the index")
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise CheckpointError(self.path / shard, f"shard listed in {INDEX_FILE} is missing",
                                          "download or copy the missing shard")
            return weight_map
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(self.path, "holds no *.safetensors weights", "save the model with safetensors")
        return {key: shard for shard in shards for key in self._open(shard).keys()}

    def _open(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(self.path / shard, f"cannot be read as safetensors ({exc})",
                                      "the file is truncated or corrupt: download it again") from None
        return self._handles[shard]

    def _check_unquantized(self) -> None:
        """No scale or packed-weight tensor (by name) but, when config.json declares FP8
        block quantization, the ``weight_scale_inv`` of a weight present (parse_config
        refused every other quantization); dtypes are checked by ``check_shapes`` from
        the headers and by ``tensor`` on every read."""
        quantized = sorted(key for key in self.weight_map if _QUANTIZED_KEY.search(key))
        if self.quantization is not None:
            quantized = [key for key in quantized
                         if not (key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) in self.weight_map)]
        if quantized:
            raise QuantizedWeightError(self.path / self.weight_map[quantized[0]], quantized[0], None, len(quantized),
                                       declared=self.quantization is not None)

    def _check_expert_count(self) -> None:
        """The experts in the weights must be the experts config.json declares."""
        found: dict[int, int] = {}
        for key in self.weight_map:
            match = _EXPERT_KEY.match(key)
            if match:
                layer, expert = int(match[1]), int(match[2])
                found[layer] = max(found.get(layer, 0), expert + 1)
        expected = self.config.num_experts
        for layer, count in sorted(found.items()):
            if count != expected and layer < self.config.num_layers:
                field = family_of(self.config.family).EXPERTS_FIELD
                raise ConfigFieldError(
                    self.path / "config.json", field, expected,
                    f"{count}: the weights of layer {layer} hold {count} experts",
                )

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def tensor(self, key: str, shape: tuple[int, ...] | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``key``; its shape must equal ``shape`` when given."""
        if key not in self.weight_map:
            raise MissingWeightError(self.path, key)
        shard = self.weight_map[key]
        value = self._read(shard, key)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise WeightShapeError(str(self.path / shard), key, tuple(value.shape), tuple(shape))
        if value.dtype in FP8_DTYPES.values() and self._scale_key(key):
            scale_key = self._scale_key(key)
            scale = self._read(self.weight_map[scale_key], scale_key)
            self._check_scale(scale_key, tuple(scale.shape), tuple(value.shape))
            return dequantize(value, scale, self.quantization.block, dtype or torch.float32)
        if value.dtype not in UNQUANTIZED.values():  # float8 or int: would be cast without its scales
            raise QuantizedWeightError(str(self.path / shard), key, str(value.dtype).removeprefix("torch."),
                                       declared=self.quantization is not None)
        return value if dtype is None else value.to(dtype)

    def _check_scale(self, scale_key: str, got: tuple[int, ...], weight_shape: tuple[int, ...]) -> None:
        expected = self.quantization.scale_shape(weight_shape)
        if got != expected:
            raise WeightShapeError(str(self.path / self.weight_map[scale_key]), scale_key, got, expected,
                                   f"weight_block_size {list(self.quantization.block)} and the weight's shape "
                                   f"{list(weight_shape)} imply it")

    def _scale_key(self, key: str) -> str | None:
        """The block scales of an FP8 weight, where config.json declares them and the
        checkpoint holds them."""
        scale = key + SCALE_SUFFIX
        return scale if self.quantization is not None and scale in self.weight_map else None

    def _read(self, shard: str, key: str) -> torch.Tensor:
        try:
            return self._open(shard).get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(self.path / shard, f"tensor '{key}' cannot be read ({exc})",
                                  "the file is truncated or corrupt: download it again") from None

    def check_finite(self, progress: bool | None = None) -> None:
        """Scan every floating-point tensor of every shard for NaN and Inf values, one
        tensor in memory at a time (safetensors reads each lazily from its file); raise
        NonFiniteWeightError naming the shard and the first bad tensor with its counts.
        ``progress``: a bar on stderr (None: where stderr is a terminal)."""
        bad: list[tuple[str, str, int, int, int]] = []  # (shard, key, nan, inf, numel)
        shards = sorted(set(self.weight_map.values()))
        with _bar(len(self.weight_map), f"checking {self.path.name} for NaN/Inf", progress) as bar:
            for shard, key in ((s, k) for s in shards for k in sorted(self._open(s).keys())):
                bar.update()
                value = self._read(shard, key)
                if value.dtype in FP8_DTYPES.values():  # no isfinite for float8 (e4m3fn has NaN, no Inf)
                    value = value.float()
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    nan = int(torch.isnan(value).sum())
                    bad.append((shard, key, nan, int(torch.isinf(value).sum()), value.numel()))
                del value
        if bad:
            shard, key, nan, inf, numel = bad[0]
            raise NonFiniteWeightError(self.path / shard, key, nan, inf, numel, [b[1] for b in bad])

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> the shape config.json implies, for every tensor the model
        reads (routed experts included); the model is built on the meta device (no memory)."""
        c = self.config
        with torch.device("meta"):
            params = MoEForCausalLM(c, False).state_dict()
        shapes = {key: tuple(params[name].shape) for name, key in _dense_keys(self, params)}
        d, i = c.hidden_size, c.moe_intermediate_size
        for layer in c.moe_layer_ids:
            for expert in range(c.num_experts):
                gate, up, down = expert_keys(c, layer, expert)
                shapes.update({gate: (i, d), up: (i, d), down: (d, i)})
        return shapes

    def check_shapes(self) -> None:
        """Every tensor config.json implies is present with its shape and an unquantized
        dtype, checked from the shard headers alone (no weight is read); raise
        MissingWeightError, WeightShapeError or QuantizedWeightError naming the first
        that is not."""
        for key, shape in self.expected_shapes().items():
            if key not in self.weight_map:
                raise MissingWeightError(self.path, key)
            shard = self.weight_map[key]
            try:
                header = self._open(shard).get_slice(key)
                got, dtype = tuple(header.get_shape()), header.get_dtype()
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(self.path / shard, f"tensor '{key}' cannot be read ({exc})",
                                      "the file is truncated or corrupt: download it again") from None
            if got != shape:
                raise WeightShapeError(str(self.path / shard), key, got, shape)
            scale_key = self._scale_key(key)
            if dtype in FP8_DTYPES and scale_key:
                scale = tuple(self._open(self.weight_map[scale_key]).get_slice(scale_key).get_shape())
                self._check_scale(scale_key, scale, shape)
            elif dtype not in UNQUANTIZED:
                raise QuantizedWeightError(str(self.path / shard), key, dtype, declared=self.quantization is not None)

    def expert_weights(self, layer: int, experts: list[int],
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked weights of ``experts`` of decoder layer ``layer``, in that order:
        ``gate_up [n, 2I, D]`` and ``down [n, D, I]``."""
        c = self.config
        d, i = c.hidden_size, c.moe_intermediate_size
        gate_up, down = [], []
        for expert in experts:
            gate, up, dn = expert_keys(c, layer, expert)
            gate_up.append(torch.cat((self.tensor(gate, (i, d), dtype), self.tensor(up, (i, d), dtype))))
            down.append(self.tensor(dn, (d, i), dtype))
        if not experts:
            return torch.empty(0, 2 * i, d, dtype=dtype), torch.empty(0, d, i, dtype=dtype)
        return torch.stack(gate_up), torch.stack(down)


def _dense_keys(ckpt: Checkpoint, names) -> list[tuple[str, str]]:
    """(model state name, checkpoint key) of every tensor but the routed experts; a tied
    ``lm_head`` reads the embedding where the checkpoint has no lm_head of its own."""
    c = ckpt.config
    pairs = []
    for name in names:
        if ".mlp.experts." in name:
            continue
        key = checkpoint_key(c, name)
        if name == "lm_head.weight" and c.tie_word_embeddings and not ckpt.has(key):
            key = checkpoint_key(c, "model.embed_tokens.weight")
        pairs.append((name, key))
    return pairs


def _bar(total: int, desc: str, progress: bool | None) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr,
                disable=None if progress is None else not progress)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, moge_groups: int | None = None,
               with_experts: bool = True, checkpoint: Checkpoint | None = None,
               progress: bool | None = None) -> MoEForCausalLM:
    """Build the model of a checkpoint directory and fill every weight (routed experts
    only when ``with_experts``). ``progress``: a bar on stderr over the tensors read (None:
    where stderr is a terminal)."""
    ckpt = checkpoint or Checkpoint(path, moge_groups)
    config = ckpt.config
    with torch.device("meta"):
        model = MoEForCausalLM(config, with_experts)
    model = model.to_empty(device="cpu").to(dtype)
    params = model.state_dict()
    dense = _dense_keys(ckpt, params)
    experts = 3 * config.num_experts * len(config.moe_layer_ids) if with_experts else 0
    with _bar(len(dense) + experts, f"loading {ckpt.path.name}", progress) as bar:
        state = {}
        for name, key in dense:
            state[name] = ckpt.tensor(key, tuple(params[name].shape), dtype)
            bar.update()
        if with_experts:
            for layer in config.moe_layer_ids:
                gate_up, down = ckpt.expert_weights(layer, list(range(config.num_experts)), dtype)
                state[f"model.layers.{layer}.mlp.experts.gate_up"] = gate_up
                state[f"model.layers.{layer}.mlp.experts.down"] = down
                bar.update(3 * config.num_experts)
    model.load_state_dict(state, strict=True)
    return model.eval()
