"""Loading errors: typed, naming the file or field, the value and the expectation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import save_tiny_model
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import Checkpoint, load_model
from raymoe.workers.model.errors import (
    CheckpointError,
    ConfigFieldError,
    MissingWeightError,
    QuantizedWeightError,
    UnsupportedModelError,
    WeightShapeError,
)


@pytest.fixture()
def ckpt(tmp_path):
    save_tiny_model("mixtral", tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Checkpoint(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        Checkpoint(tmp_path / "nope")


def test_invalid_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint(ckpt)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        Checkpoint(ckpt)


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, model_type="llama4_moe")
    with pytest.raises(UnsupportedModelError) as err:
        Checkpoint(ckpt)
    assert err.value.field == "model_type" and err.value.value == "llama4_moe"
    assert "mixtral" in str(err.value)


@pytest.mark.parametrize("field,value", [("hidden_size", -4), ("num_local_experts", "eight"),
                                         ("num_key_value_heads", 3), ("hidden_act", "gelu"),
                                         ("num_experts_per_tok", 99)])
def test_bad_field_named(ckpt, field, value):
    _edit_config(ckpt, **{field: value})
    with pytest.raises(ConfigFieldError) as err:
        Checkpoint(ckpt)
    assert err.value.field == field and err.value.value == value
    assert field in str(err.value) and str(ckpt / "config.json") in str(err.value)


def test_mismatched_num_experts(ckpt):
    _edit_config(ckpt, num_local_experts=8)  # the weights hold 6
    with pytest.raises(ConfigFieldError) as err:
        Checkpoint(ckpt)
    assert err.value.field == "num_local_experts" and err.value.value == 8
    assert "hold 6 experts" in str(err.value)


def test_wrong_shape(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight"
    tensors[key] = torch.zeros(16, 32)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(WeightShapeError) as err:
        load_model(ckpt)
    assert err.value.key == key and err.value.got == (16, 32) and err.value.expected == (32, 32)


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(MissingWeightError, match=r"experts\.3\.w2"):
        load_model(ckpt)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(ckpt)


def test_sharded_checkpoint_loads_and_missing_shard_named(tmp_path):
    hf = save_tiny_model("qwen2_moe", tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path)
    prompt = [3, 14, 15, 92, 65]
    with torch.no_grad():
        diff = (model(ForwardBatch.build([prompt], [0]), all_logits=True) - hf(torch.tensor([prompt])).logits[0])
    assert diff.abs().max() <= 1e-5
    shards[1].unlink()
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert shards[1].name in str(err.value) and "missing" in str(err.value)


def test_unsupported_rope_scaling(ckpt):
    """Scaled RoPE that changes with the sequence length is refused (the supported
    types are tested against transformers in test_rope_scaling.py)."""
    _edit_config(ckpt, rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="rope_type"):
        Checkpoint(ckpt)


def test_moge_groups_must_divide(ckpt):
    with pytest.raises(ConfigFieldError, match="moge_num_groups"):
        Checkpoint(ckpt, moge_groups=4)  # 6 experts


def test_check_shapes_reads_headers_only_and_names_the_tensor(ckpt, monkeypatch):
    """What ``Deployment`` runs before any actor starts (a wrong shape used to surface as
    an ActorDiedError from inside the actors)."""
    Checkpoint(ckpt).check_shapes()
    tensors = load_file(ckpt / "model.safetensors")
    key = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    tensors[key] = torch.zeros(32, 40)
    save_file(tensors, ckpt / "model.safetensors")
    checkpoint = Checkpoint(ckpt)
    monkeypatch.setattr(Checkpoint, "_read", lambda *a: pytest.fail("check_shapes read a weight"))
    with pytest.raises(WeightShapeError) as err:
        checkpoint.check_shapes()
    assert err.value.key == key and err.value.got == (32, 40) and err.value.expected == (32, 48)
    del tensors[key]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(MissingWeightError, match=r"experts\.5\.w2"):
        Checkpoint(ckpt).check_shapes()


QUANTIZATION_CONFIGS = [  # as the real checkpoints of each method write them; block FP8 loads (test_fp8_checkpoint)
    {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}},
    {"quant_method": "mxfp4"},
]


@pytest.mark.parametrize("quant", QUANTIZATION_CONFIGS, ids=lambda q: q["quant_method"])
def test_quantized_checkpoint_is_refused_by_its_quant_method(ckpt, quant):
    _edit_config(ckpt, quantization_config=quant)
    with pytest.raises(UnsupportedModelError) as err:
        Checkpoint(ckpt)
    assert err.value.field == "quantization_config.quant_method" and err.value.value == quant["quant_method"]
    assert "quant_method fp8 with weight_block_size" in str(err.value)


def _edit_tensors(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


@pytest.mark.parametrize("key,dtype", [(Q_PROJ, torch.float8_e4m3fn), (EXPERT, torch.float8_e5m2),
                                       (EXPERT, torch.int8)])
def test_quantized_tensors_without_quantization_config_are_refused(ckpt, key, dtype):
    """From the headers before any actor starts (check_shapes), and on reading (load_model,
    the reference engine's path): a float8 weight is never cast and used without its scales."""
    _edit_tensors(ckpt, lambda t: t.__setitem__(key, t[key].to(dtype)))
    with pytest.raises(QuantizedWeightError) as err:
        Checkpoint(ckpt).check_shapes()
    header = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8"}[dtype]
    assert (err.value.key, err.value.dtype) == (key, header) and "config.json has no quantization_config" in str(
        err.value)
    with pytest.raises(QuantizedWeightError) as err:
        load_model(ckpt)
    assert err.value.key == key and err.value.dtype == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("extra", [f"{Q_PROJ}_scale_inv", Q_PROJ.replace("weight", "weight_scale"),
                                   Q_PROJ.replace("weight", "qweight"), Q_PROJ.replace("weight", "qzeros")])
def test_scale_and_packed_weight_tensors_are_refused_by_name(ckpt, extra):
    _edit_tensors(ckpt, lambda t: t.__setitem__(extra, torch.ones(2, 2)))
    with pytest.raises(QuantizedWeightError) as err:
        Checkpoint(ckpt)
    assert err.value.key == extra and err.value.dtype is None and "is a quantization scale" in str(err.value)


def test_generate_cli_refuses_an_awq_checkpoint_in_one_line(ckpt):
    _edit_config(ckpt, quantization_config=QUANTIZATION_CONFIGS[0])
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "raymoe.deploy.cli", "generate", "--model", str(ckpt), "--prompt-ids",
                           "1,2", "--max-new-tokens", "1"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line == (f"raymoe: error: {ckpt / 'config.json'}: field 'quantization_config.quant_method' = 'awq'; "
                    "expected no quantization, or quant_method fp8 with weight_block_size (DeepSeek-V3 / Qwen3-FP8 "
                    "style, dequantized on load): raymoe loads unquantized weights otherwise; use the original "
                    "checkpoint")


@pytest.mark.parametrize("error", [CheckpointError("m/x", "bad", "fix it"), WeightShapeError("m/x", "k", (1, 2), (2, 1)),
                                   MissingWeightError("m/x", "k"), ConfigFieldError("m/c", "f", 3, "an int"),
                                   UnsupportedModelError("m/c", "model_type", "x", "mixtral"),
                                   QuantizedWeightError("m/x", "k", "F8_E4M3", 3)],
                         ids=lambda e: type(e).__name__)
def test_errors_survive_pickling(error):
    """Ray carries an actor's error to the driver by pickle; before __reduce__, these
    arrived as UnserializableException (their __init__ takes more than the message)."""
    import pickle

    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)


def test_loading_and_the_finite_check_show_progress_on_request(ckpt, capsys):
    """A bar on stderr over the tensors read (on by default only where stderr is a
    terminal, so not here)."""
    tensors = len(Checkpoint(ckpt).weight_map)
    load_model(ckpt)
    Checkpoint(ckpt).check_finite()
    assert capsys.readouterr().err == ""
    load_model(ckpt, progress=True)
    Checkpoint(ckpt).check_finite(progress=True)
    err = capsys.readouterr().err
    assert f"loading {ckpt.name}" in err and f"{tensors}/{tensors}" in err
    assert f"checking {ckpt.name} for NaN/Inf" in err
