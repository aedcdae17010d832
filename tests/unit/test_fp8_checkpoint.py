"""FP8 block-quantized checkpoints (``workers/model/quantization.py``), built here: a tiny
random model's linear weights quantized to float8_e4m3fn by blocks, with their
``weight_scale_inv``, and the ``quantization_config`` DeepSeek-V3 ships. Loaded, they
equal the dequantized weights exactly (the same logits, bit for bit, and the same greedy
tokens as the dequantized checkpoint; transformers on the dequantized checkpoint to 1e-5);
every variant raymoe does not load is refused naming its field or tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import Checkpoint, load_model
from raymoe.workers.model.errors import ConfigFieldError, QuantizedWeightError, UnsupportedModelError, WeightShapeError
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

from tests.tiny_models import fp8_checkpoint

PROMPT = [5, 17, 33, 2, 61, 9, 44, 80, 12, 7, 29, 3]
@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3"])
def family(request):
    return request.param


@pytest.mark.parametrize("block", [(128, 128), (16, 24)], ids=["128x128", "16x24"])
def test_an_fp8_checkpoint_loads_as_its_dequantized_weights(tiny_model, tmp_path, family, block):
    """16x24 blocks cut the tiny weights into several blocks, some partial."""
    src = tiny_model(family, seed=3)
    fp8, plain, keys = fp8_checkpoint(src, tmp_path / "fp8", block)
    assert len(keys) > 10 and any("experts" in k for k in keys)
    assert any(v.dtype == torch.float8_e4m3fn for v in load_file(fp8 / "model.safetensors").values())
    Checkpoint(fp8).check_shapes()
    Checkpoint(fp8).check_finite()
    ours, reference = load_model(fp8), load_model(plain)
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    batch = ForwardBatch.build([PROMPT], [0])
    with torch.no_grad():
        logits = ours(batch, all_logits=True)
        assert torch.equal(logits, reference(batch, all_logits=True))
        assert not torch.equal(logits, load_model(src)(batch, all_logits=True))  # quantized: not a no-op
    # e4m3 keeps 3 mantissa bits: each weight within a few percent of the unquantized one
    # (the tiny random models' logits move more: their routing is chaotic)
    original = load_file(src / "model.safetensors")
    plain_weights = load_file(plain / "model.safetensors")
    errors = {k: ((plain_weights[k] - original[k]).norm() / original[k].norm()).item() for k in keys}
    assert 0 < max(errors.values()) < 0.05, max(errors.items(), key=lambda kv: kv[1])


def test_transformers_on_the_dequantized_weights_agrees(tiny_model, tmp_path, family):
    import transformers as T

    fp8, plain, _ = fp8_checkpoint(tiny_model(family, seed=3), tmp_path / "fp8", (16, 24))
    hf = T.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
        got = load_model(fp8)(ForwardBatch.build([PROMPT], [0]), all_logits=True)
    assert (got - want).abs().max().item() <= 1e-5


def test_greedy_tokens_and_expert_slots_equal_the_dequantized_checkpoint(tiny_model, tmp_path):
    fp8, plain, _ = fp8_checkpoint(tiny_model("mixtral", seed=3), tmp_path / "fp8", (16, 24))
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    outputs = []
    for path in (fp8, plain):
        engine = ReferenceEngine.from_pretrained(path, max_seqs=1)
        outputs.append(engine.generate_ids([PROMPT], params)[0].output_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 20
    # an expert rank reads only its slots: they dequantize alone, in the serving dtype
    for a, b in zip(Checkpoint(fp8).expert_weights(1, [4, 0], torch.bfloat16),
                    Checkpoint(plain).expert_weights(1, [4, 0], torch.bfloat16)):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize("change,field,error", [
    ({"weight_block_size": None}, "quantization_config.weight_block_size", UnsupportedModelError),  # per-tensor
    ({"activation_scheme": "static"}, "quantization_config.activation_scheme", UnsupportedModelError),
    ({"fmt": "e5m2"}, "quantization_config.fmt", UnsupportedModelError),
    ({"weight_block_size": [128]}, "quantization_config.weight_block_size", ConfigFieldError),
    ({"weight_block_size": [0, 128]}, "quantization_config.weight_block_size", ConfigFieldError),
])
def test_fp8_variants_not_loaded_are_refused_by_field(tiny_model, tmp_path, change, field, error):
    fp8, _, _ = fp8_checkpoint(tiny_model("mixtral", seed=3), tmp_path / "fp8", (128, 128))
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"].update(change)
    config["quantization_config"] = {k: v for k, v in config["quantization_config"].items() if v is not None}
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(error) as err:
        Checkpoint(fp8)
    assert err.value.field == field


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _edit(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_an_fp8_weight_without_its_scales_is_refused(tiny_model, tmp_path):
    fp8, _, _ = fp8_checkpoint(tiny_model("mixtral", seed=3), tmp_path / "fp8", (128, 128))
    _edit(fp8, lambda t: t.pop(Q_PROJ + "_scale_inv"))
    with pytest.raises(QuantizedWeightError) as err:
        Checkpoint(fp8).check_shapes()  # from the headers, before any actor starts
    assert (err.value.key, err.value.dtype) == (Q_PROJ, "F8_E4M3") and "_scale_inv" in str(err.value)
    with pytest.raises(QuantizedWeightError) as err:
        load_model(fp8)
    assert err.value.key == Q_PROJ


def test_scales_of_the_wrong_shape_are_refused(tiny_model, tmp_path):
    fp8, _, _ = fp8_checkpoint(tiny_model("mixtral", seed=3), tmp_path / "fp8", (16, 24))
    _edit(fp8, lambda t: t.__setitem__(Q_PROJ + "_scale_inv", torch.ones(1, 1)))
    for load in (lambda: Checkpoint(fp8).check_shapes(), lambda: load_model(fp8)):
        with pytest.raises(WeightShapeError) as err:
            load()
        assert err.value.key == Q_PROJ + "_scale_inv" and err.value.expected == (2, 2)
        assert "weight_block_size [16, 24]" in str(err.value)


def test_tensors_of_another_scheme_are_refused_in_an_fp8_checkpoint(tiny_model, tmp_path):
    fp8, _, _ = fp8_checkpoint(tiny_model("mixtral", seed=3), tmp_path / "fp8", (128, 128))
    extra = Q_PROJ.replace("weight", "input_scale")  # a static activation scale
    _edit(fp8, lambda t: t.__setitem__(extra, torch.ones(1)))
    with pytest.raises(QuantizedWeightError) as err:
        Checkpoint(fp8)
    assert err.value.key == extra and "FP8 block quantization does not explain" in str(err.value)
