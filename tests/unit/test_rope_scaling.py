"""Scaled RoPE (linear, llama3, yarn; DeepSeek's yarn with its softmax mscale) against
transformers: logits in one pass and through the KV cache (1e-5, float32), and 20
greedy tokens, on tiny models whose positions reach past the original context."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_models import assert_kv_cache_walk_matches, save_tiny_model
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.model.errors import ConfigFieldError, UnsupportedModelError
from raymoe.workers.model.families import parse_config
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

# original_max_position_embeddings is small, so the test's positions (up to ~60) are past it.
CASES = {
    "mixtral-linear": ("mixtral", {"rope_type": "linear", "factor": 4.0}),
    "mixtral-llama3": ("mixtral", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen3_moe-yarn": ("qwen3_moe", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "deepseek_v2-yarn": ("deepseek_v2", {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 8,
                                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "deepseek_v3-yarn": ("deepseek_v3", {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 8,
                                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}
PROMPT = [5, 17, 33, 2, 90, 41, 7, 11, 3, 60, 61, 62, 63, 9, 8, 70, 71, 72, 3, 4, 5, 6, 12, 13, 14, 15, 16, 17, 18,
          19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    family, rope = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(family, path, rope_parameters={**rope, "rope_theta": 10000.0})
    saved = json.loads((path / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == rope["rope_type"]  # the checkpoint really carries the scaling
    return hf, load_model(path), path


def test_scaled_rope_logits_match_transformers(pair):
    hf, ours, _ = pair
    assert ours.config.rope_scaling is not None
    batch = ForwardBatch.build([PROMPT], [0])
    with torch.no_grad():
        got = ours(batch, all_logits=True)
        want = hf(torch.tensor([PROMPT])).logits[0]
    assert (got - want).abs().max().item() <= 1e-5


def test_scaled_rope_through_the_kv_cache(pair):
    hf, ours, _ = pair
    assert_kv_cache_walk_matches(hf, ours, PROMPT, prefill=20, max_seqs=2)


def test_scaled_rope_greedy_tokens_match_transformers(pair):
    hf, ours, _ = pair
    (got,) = ReferenceEngine(ours, max_seqs=2).generate_ids([PROMPT], SamplingParams(max_new_tokens=20,
                                                                                      ignore_eos=True))
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert got.output_ids == out[0, len(PROMPT):].tolist()


def test_the_scaling_changes_the_logits(pair, tmp_path):
    """Not a no-op: the same weights with default RoPE give other logits."""
    _, ours, path = pair
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for f in path.glob("*.safetensors"):
        (tmp_path / f.name).symlink_to(f)
    plain = load_model(tmp_path)
    batch = ForwardBatch.build([PROMPT], [0])
    with torch.no_grad():
        assert (ours(batch, all_logits=True) - plain(batch, all_logits=True)).abs().max().item() > 1e-3


def _config(rope: dict) -> dict:
    return {"model_type": "mixtral", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
            "num_experts_per_tok": 2, "rope_parameters": {"rope_theta": 10000.0, **rope}}


@pytest.mark.parametrize("rope, error, field", [
    ({"rope_type": "dynamic", "factor": 2.0}, UnsupportedModelError, "rope_parameters.rope_type"),
    ({"rope_type": "longrope", "factor": 2.0}, UnsupportedModelError, "rope_parameters.rope_type"),
    ({"rope_type": "su"}, UnsupportedModelError, "rope_parameters.rope_type"),
    ({"rope_type": "linear"}, ConfigFieldError, "rope_parameters.factor"),
    ({"rope_type": "yarn", "factor": 4.0}, ConfigFieldError, "rope_parameters.original_max_position_embeddings"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0}, ConfigFieldError, "rope_parameters.high_freq_factor"),
    ({"rope_type": "linear", "factor": -2}, ConfigFieldError, "rope_parameters.factor"),
])
def test_unsupported_or_incomplete_rope_parameters_are_refused_by_name(rope, error, field):
    with pytest.raises(error) as caught:
        parse_config(_config(rope), "config.json")
    assert field in str(caught.value)


def test_the_older_rope_scaling_field_is_read_too():
    config = _config({})
    del config["rope_parameters"]
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    assert parse_config(config, "config.json").rope_scaling.factor == 2.0
