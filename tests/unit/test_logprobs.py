"""Log-probabilities (issue 18 item 2): the sampler scores the sampled token on the
distribution after the logits processors and the temperature, the engines return them
per token, and ``deploy/logprobs.py`` writes OpenAI's shapes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.deploy.logprobs import FLOOR, chat_logprobs, completion_logprobs
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import (
    History,
    SamplingParams,
    SamplingParamsError,
    TokenLogprob,
    process_logits,
    sample_and_score,
)
from tests.paths import ROOT


def test_each_row_is_scored_on_its_own_distribution():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(logprobs=3), SamplingParams(temperature=0.7, seed=1, logprobs=0),
              SamplingParams(logprobs=5, frequency_penalty=2.0, logit_bias=((7, 9.0),)), SamplingParams()]
    histories = [History(), History(), History(output=(3, 3, 9)), History()]
    tokens, scores = sample_and_score(logits, params, [0, 0, 3, 0], histories)
    assert scores[3] is None  # not asked for
    greedy = torch.log_softmax(logits[0], -1)
    assert tokens[0] == int(logits[0].argmax()) and scores[0].logprob == pytest.approx(float(greedy.max()))
    assert [t for t, _ in scores[0].top] == torch.topk(logits[0], 3).indices.tolist()
    warm = torch.log_softmax(logits[1] / 0.7, -1)  # after the temperature
    assert scores[1].logprob == pytest.approx(float(warm[tokens[1]])) and scores[1].top == ()
    processed = torch.log_softmax(process_logits(logits[2], params[2], histories[2]), -1)  # after the processors
    assert tokens[2] == 7 and scores[2].logprob == pytest.approx(float(processed[7]))
    assert scores[2].top[0][0] == 7


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 20), st.floats(0.05, 3.0))
def test_top_logprobs_are_sorted_and_normalised(seed, top, temperature):
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed)) * 4
    params = SamplingParams(temperature=temperature, seed=seed, logprobs=top)
    (token,), (entry,) = sample_and_score(logits, [params], [0], [History()])
    values = [v for _, v in entry.top]
    assert len(values) == top and values == sorted(values, reverse=True)
    assert sum(math.exp(v) for v in values) <= 1 + 1e-5
    assert entry.token == token and entry.logprob <= 0 and (not values or entry.logprob <= values[0] + 1e-6)


@pytest.mark.parametrize("value", [-1, 21, 2.0, True])
def test_logprobs_out_of_range_are_refused(value):
    with pytest.raises(SamplingParamsError, match="logprobs"):
        SamplingParams(logprobs=value)


def test_the_engine_returns_one_logprob_per_generated_token():
    engine = ReferenceEngine(load_model(ROOT / "models" / "tiny-moe"), max_seqs=4)
    params = SamplingParams(max_new_tokens=5, logprobs=2, ignore_eos=True)
    done = engine.generate_ids([[5, 6, 7, 8], [9, 10]], [params, SamplingParams(max_new_tokens=3)])
    assert [e.token for e in done[0].logprobs] == done[0].output_ids and done[1].logprobs is None


def test_openai_shapes():
    text_of = {1: "a", 2: "bc", 3: "\ufffd"}.get
    entries = [TokenLogprob(2, -0.5, ((2, -0.5), (1, -1.5))), TokenLogprob(3, -3.0, ((1, -0.1),)),
               TokenLogprob(1, float("-inf"), ())]
    out = completion_logprobs(entries, text_of, start=4)
    assert out == {"tokens": ["bc", "\ufffd", "a"], "token_logprobs": [-0.5, -3.0, FLOOR],
                   "top_logprobs": [{"bc": -0.5, "a": -1.5}, {"a": -0.1, "\ufffd": -3.0}, {"a": FLOOR}],
                   "text_offset": [4, 6, 7]}
    chat = chat_logprobs(entries[:1], text_of)
    assert chat == {"content": [{"token": "bc", "logprob": -0.5, "bytes": [98, 99], "top_logprobs": [
        {"token": "bc", "logprob": -0.5, "bytes": [98, 99]}, {"token": "a", "logprob": -1.5, "bytes": [97]}]}]}


@pytest.mark.parametrize("budget, pool_blocks", [(None, None), (16, None), (16, 6)])
def test_prompt_logprobs_equal_one_pass_over_the_prompt(budget, pool_blocks):
    """``prompt_logprobs`` (echo): every prompt token after the first is scored by the
    model's log-softmax at the position before it, as one pass over the whole prompt
    without a cache gives it, whether the prompt is prefilled whole, in 16-token chunks,
    or (a 6-block pool shared by two prompts) recomputed after a preemption; nothing
    twice, and the cached prefix is not used for it."""
    from raymoe.workers.model.attention import cache_shapes
    from raymoe.workers.model.batch import ForwardBatch
    from raymoe.workers.model.kv_cache import token_bytes

    model = load_model(ROOT / "models" / "tiny-moe")
    prompts = [list(range(10, 60)), list(range(100, 140))]
    memory = None if pool_blocks is None else pool_blocks * 16 * token_bytes(cache_shapes(model.config), torch.float32)
    engine = ReferenceEngine(model, max_seqs=4, max_seq_len=96, max_num_batched_tokens=budget, kv_cache_memory=memory)
    engine.generate_ids([prompts[0][:40] + [1]], SamplingParams(max_new_tokens=1))  # a cached prefix of prompt 0
    params = SamplingParams(max_new_tokens=20, prompt_logprobs=3, ignore_eos=True)
    done = engine.generate_ids(prompts, params)
    if pool_blocks:
        assert engine.scheduler.stats.preemptions > 0
    with torch.inference_mode():
        for prompt, completion in zip(prompts, done):
            want = torch.log_softmax(model(ForwardBatch.build([prompt], [0]), all_logits=True), -1)
            got = completion.prompt_logprobs
            assert [e.token for e in got] == prompt and got[0].logprob is None and completion.logprobs is None
            for i, entry in enumerate(got[1:]):
                assert entry.logprob == pytest.approx(float(want[i, prompt[i + 1]]), abs=1e-5)
                assert [t for t, _ in entry.top] == torch.topk(want[i], 3).indices.tolist()
