"""raymoe's pure-torch model against transformers' own implementation, every family."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import FAMILIES, assert_kv_cache_walk_matches, save_tiny_model
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3], [60, 61, 62, 63, 9, 8, 70, 71, 72, 3, 4, 5, 6]]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(request.param, path)
    return hf, load_model(path), path


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    batch = ForwardBatch.build(PROMPTS, [0] * len(PROMPTS))
    with torch.no_grad():
        got = ours(batch, all_logits=True)
        for b, prompt in enumerate(PROMPTS):
            want = hf(torch.tensor([prompt])).logits[0]
            diff = (got[batch.seq_index == b] - want).abs().max().item()
            assert diff <= 1e-5, f"prompt {b}: max |logits diff| = {diff}"


def test_logits_with_kv_cache_match(pair):
    """Prefill, then feed tokens one by one through the cache: same logits as one pass."""
    hf, ours, _ = pair
    assert_kv_cache_walk_matches(hf, ours, PROMPTS[2], prefill=5)


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    engine = ReferenceEngine(ours, max_seqs=4)
    got = engine.generate_ids(PROMPTS, SamplingParams(max_new_tokens=20, ignore_eos=True))
    for prompt, completion in zip(PROMPTS, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert completion.output_ids == out[0, len(prompt):].tolist()
        assert len(completion.output_ids) == 20 and completion.finish_reason == "length"
