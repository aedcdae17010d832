"""The sampler's logits processors (``workers/sampling.py``): the ban under
``min_tokens``, ``logit_bias``, the repetition, frequency and presence penalties and
``min_p``, each against its definition written out here (vLLM's and OpenAI's), and
through the reference engine: a bias forces a token, ``min_tokens`` holds a stop back,
penalties break the shipped model's loops. The runtime against the reference engine with
the same parameters: tests/cluster/test_runtime.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import History, SamplingParams, SamplingParamsError, _filtered_probs, process_logits

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "tiny-moe"


def test_each_processor_follows_its_definition():
    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    before = logits.clone()
    prompt, output = (3, 4, 4, 7), (7, 9, 9, 9, 11)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3,
                       logit_bias=((2, 5.0), (9, -1.5)), min_tokens=2, max_new_tokens=8)
    got = process_logits(logits, p, History(banned=(0, 1), prompt=prompt, output=output))
    want = logits.clone()
    want[[0, 1]] = float("-inf")
    want[2] += 5.0
    want[9] += -1.5
    for t in set(prompt + output):
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t in set(output):
        want[t] -= 0.25 * output.count(t) + 0.5
    assert torch.equal(got, want)
    assert torch.equal(logits, before)  # the input is left as it was


def test_extreme_penalties_keep_the_logits_numbers():
    """repetition_penalty 1e-45 divides positive logits to inf: the row stays samplable."""
    p = SamplingParams(repetition_penalty=1.401298464324817e-45, temperature=0.7, seed=1)
    logits = process_logits(torch.tensor([2.0, 1.0, -1.0, 0.5]), p, History(prompt=(0, 1, 3)))
    assert not torch.isnan(logits).any() and not torch.isposinf(logits).any()
    probs = _filtered_probs(logits, p)
    assert not torch.isnan(probs).any() and abs(probs.sum().item() - 1) < 1e-6


def test_min_p_drops_the_unlikely_and_renormalises():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = _filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.2))  # threshold 0.1
    assert probs[3] == 0 and torch.allclose(probs[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95)


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("repetition_penalty", 0), ("min_p", 1.5), ("min_tokens", -1),
                                         ("logit_bias", ((5, 101.0),)),
                                         ("min_tokens", 40)])
def test_out_of_range_values_are_refused_by_name(field, value):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(max_new_tokens=32, **{field: value})
    assert err.value.field == field


@pytest.fixture(scope="module")
def engine():
    return ReferenceEngine.from_pretrained(SHIPPED, max_seqs=4)


PROMPT = list(range(3, 40))


def _out(engine, **params) -> list[int]:
    return engine.generate_ids([PROMPT], SamplingParams(max_new_tokens=24, ignore_eos=True, **params))[0].output_ids


def test_a_bias_forces_a_token_and_min_tokens_holds_a_stop_back(engine):
    assert _out(engine, logit_bias=((77, 100.0),)) == [77] * 24
    held = engine.generate_ids([PROMPT], SamplingParams(max_new_tokens=24, logit_bias=((77, 100.0),),
                                                        stop_token_ids=(77,), min_tokens=5))[0]
    assert len(held.output_ids) == 6 and held.output_ids[-1] == 77 and 77 not in held.output_ids[:5]
    assert held.finish_reason == "stop"


def test_penalties_break_the_loop_of_greedy_decoding(engine):
    plain = _out(engine)
    assert max(plain.count(t) for t in set(plain)) >= 8  # the shipped model repeats itself greedily
    for params in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        penalized = _out(engine, **params)
        assert penalized != plain, params
        assert max(penalized.count(t) for t in set(penalized)) < max(plain.count(t) for t in set(plain)), params
    seeded = dict(temperature=0.8, seed=5, frequency_penalty=1.0, min_p=0.05)
    assert _out(engine, **seeded) == _out(engine, **seeded)  # seeded: the same tokens again
