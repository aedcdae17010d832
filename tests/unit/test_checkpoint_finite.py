"""NaN and Inf weights: ``Checkpoint.check_finite`` finds them before any actor starts,
naming the shard, the tensor and the counts. Without the check a NaN weight loads
silently and shows up only as NaN logits: greedy decoding then emits token 0 for every
step (``argmax`` of an all-NaN row) and sampling fails the step (``multinomial`` refuses
NaN probabilities), so ``check_finite: true`` is the place to catch it.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import save_tiny_model
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import Checkpoint, load_model
from raymoe.workers.model.errors import CheckpointError, NonFiniteWeightError
from raymoe.workers.sampling import SamplingParams, sample

EXPERT_KEY = "model.layers.1.block_sparse_moe.experts.2.w1.weight"  # [I, D] of expert 2, layer 1
ATTENTION_KEY = "model.layers.0.self_attn.k_proj.weight"
PROMPT = [3, 14, 15, 92, 65]


@pytest.fixture()
def ckpt(tmp_path):
    save_tiny_model("mixtral", tmp_path)
    return tmp_path


def _plant(path, key: str, value: float, count: int = 1, shard: str = "model.safetensors") -> None:
    """Set the first ``count`` entries of tensor ``key`` to ``value``."""
    tensors = load_file(path / shard)
    tensors[key].view(-1)[:count] = value
    save_file(tensors, path / shard, metadata={"format": "pt"})


def test_clean_checkpoint_passes(ckpt):
    assert Checkpoint(ckpt).check_finite() is None


def test_nan_in_an_expert_weight_is_named(ckpt):
    _plant(ckpt, EXPERT_KEY, math.nan, count=3)
    with pytest.raises(NonFiniteWeightError) as err:
        Checkpoint(ckpt).check_finite()
    e = err.value
    assert isinstance(e, CheckpointError) and e.path == str(ckpt / "model.safetensors")
    assert (e.key, e.nan, e.inf, e.numel) == (EXPERT_KEY, 3, 0, 48 * 32)
    assert EXPERT_KEY in str(e) and "3 NaN" in str(e) and "check_finite: false" in str(e)


def test_inf_in_an_attention_weight_is_named(ckpt):
    _plant(ckpt, ATTENTION_KEY, -math.inf, count=2)
    with pytest.raises(NonFiniteWeightError) as err:
        Checkpoint(ckpt).check_finite()
    assert (err.value.key, err.value.nan, err.value.inf) == (ATTENTION_KEY, 0, 2)
    assert "2 Inf" in str(err.value)


def test_every_bad_tensor_is_listed(ckpt):
    _plant(ckpt, EXPERT_KEY, math.nan)
    _plant(ckpt, ATTENTION_KEY, math.inf)
    with pytest.raises(NonFiniteWeightError) as err:
        Checkpoint(ckpt).check_finite()
    assert sorted(err.value.bad_keys) == sorted([EXPERT_KEY, ATTENTION_KEY])
    assert "2 tensors are not finite" in str(err.value)


def test_half_precision_and_the_bad_shard_of_a_sharded_checkpoint(tmp_path):
    save_tiny_model("qwen2_moe", tmp_path, max_shard_size="40KB")
    ckpt = Checkpoint(tmp_path)
    ckpt.check_finite()
    key = "model.layers.2.mlp.experts.4.down_proj.weight"
    shard = ckpt.weight_map[key]
    tensors = load_file(tmp_path / shard)
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    tensors[key][0, 0] = math.nan
    save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightError) as err:
        Checkpoint(tmp_path).check_finite()
    assert err.value.path == str(tmp_path / shard) and err.value.key == key and err.value.nan == 1


def test_without_the_check_a_nan_weight_gives_nan_logits(ckpt):
    """What happens when nobody checks: the load succeeds; an attention NaN poisons every
    logit; greedy picks token 0 from an all-NaN row; sampling raises."""
    _plant(ckpt, ATTENTION_KEY, math.nan)
    model = load_model(ckpt)  # no error: load_model does not scan values
    with torch.no_grad():
        logits = model(ForwardBatch.build([PROMPT], [0]), all_logits=True)
    assert torch.isnan(logits).all()
    last = logits[-1:]
    assert sample(last, [SamplingParams(temperature=0.0)], [0]) == [0]
    with pytest.raises(RuntimeError, match="probability tensor"):
        sample(last, [SamplingParams(temperature=1.0, seed=1)], [0])


def test_without_the_check_a_nan_expert_poisons_the_tokens_routed_to_it(ckpt):
    """An expert's NaN reaches only the tokens routed to that expert (and, through
    attention, the positions after them); the clean model's logits are finite."""
    clean = load_model(ckpt)
    for expert in range(6):
        _plant(ckpt, f"model.layers.0.block_sparse_moe.experts.{expert}.w2.weight", math.nan)
    poisoned = load_model(ckpt)
    batch = ForwardBatch.build([PROMPT], [0])
    with torch.no_grad():
        assert torch.isfinite(clean(batch, all_logits=True)).all()
        assert torch.isnan(poisoned(ForwardBatch.build([PROMPT], [0]), all_logits=True)).all()
