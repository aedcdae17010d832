"""Structured output (issue 18 item 3): llguidance's token masks in the batched sampler.
Outputs of random JSON schemas parse and validate (hypothesis, the shipped model, greedy
and sampled); regexes and choices match; a guided request beside unguided ones gets the
text it gets alone; the per-sequence matcher cache gives the masks a fresh matcher gives."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raymoe.workers.guided import GuideError, Guides, check_guide
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams, SamplingParamsError
from raymoe.workers.scheduler import Request, RequestError, Scheduler
from tests.paths import ROOT

MODEL = ROOT / "models" / "tiny-moe"


@pytest.fixture(scope="module")
def engine():
    return ReferenceEngine.from_pretrained(MODEL, max_seqs=8)


LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 2000)),
    st.just({"type": "boolean"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
    st.builds(lambda values: {"enum": values}, st.lists(st.sampled_from(["red", "green", "x y", "3"]), min_size=1,
                                                        max_size=3, unique=True)),
)
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(
    st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, inner, st.integers(0, 3)),
    st.builds(lambda props: {"type": "object", "properties": props, "required": sorted(props),
                             "additionalProperties": False},
              st.dictionaries(st.sampled_from(["a", "b", "name", "id"]), inner, min_size=1, max_size=3))),
    max_leaves=6)
FLAT_SCHEMAS = st.builds(lambda props: {"type": "object", "properties": props, "required": sorted(props),
                                        "additionalProperties": False},
                         st.dictionaries(st.sampled_from(["a", "b", "id"]), LEAVES, min_size=1, max_size=2))
SCHEMAS = st.builds(lambda props: {"type": "object", "properties": props, "required": sorted(props),
                                   "additionalProperties": False},
                    st.dictionaries(st.sampled_from(["a", "b", "name", "id", "tags"]), VALUES, min_size=1, max_size=3))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SCHEMAS, st.sampled_from([0.0, 1.0]), st.integers(0, 1000))
def test_outputs_of_random_schemas_parse_and_validate(engine, schema, temperature, seed):
    params = SamplingParams(max_new_tokens=300, temperature=temperature, seed=seed,
                            guide=("json_schema", json.dumps(schema)))
    (done,) = engine.generate(["def parse(text):"], params)
    assert done.finish_reason == "stop", done.text
    jsonschema.validate(json.loads(done.text), schema)


def test_regex_and_choice(engine):
    regex = SamplingParams(max_new_tokens=40, temperature=1.0, seed=2, guide=("regex", r"[0-9]{3}-[a-z]{2,4}"))
    choice = SamplingParams(max_new_tokens=40, guide=("choice", json.dumps(["yes", "no", "maybe so"])))
    got = engine.generate(["import os", "import os"], [regex, choice])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", got[0].text) and got[1].text in ("yes", "no", "maybe so")


def test_a_guided_request_beside_others_gets_its_own_text(engine):
    prompts = ["def f(x):", "class A:", "import sys"]
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True),
              SamplingParams(max_new_tokens=60, guide=("json_schema", json.dumps(
                  {"type": "object", "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["k"], "additionalProperties": False}))),
              SamplingParams(max_new_tokens=12, temperature=0.8, seed=5, ignore_eos=True)]
    together = [c.text for c in engine.generate(prompts, params)]
    alone = [engine.generate([p], [sp])[0].text for p, sp in zip(prompts, params)]
    assert together == alone and json.loads(together[1])["k"] in range(100)


def test_cached_matchers_give_the_masks_of_fresh_ones(engine):
    guide = ("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}},
                                        "required": ["a"], "additionalProperties": False}))
    (walk,) = engine.generate(["x = "], SamplingParams(max_new_tokens=60, temperature=1.0, seed=4, guide=guide))
    assert walk.finish_reason == "stop" and walk.output_ids[-1] in engine.eos_token_ids
    tokens = walk.output_ids[:-1]  # what the matcher allowed, then end-of-sequence
    cached = Guides(engine.tokenizer.json_text, engine.model.config.vocab_size, engine.eos_token_ids)
    for n in range(len(tokens) + 1):
        fresh = Guides(engine.tokenizer.json_text, engine.model.config.vocab_size, engine.eos_token_ids)
        want = fresh.allowed(0, guide, tuple(tokens[:n]))
        assert torch.equal(cached.allowed(7, guide, tuple(tokens[:n])), want)
        if n < len(tokens):
            assert bool(want[tokens[n]])  # the text's next token is allowed
    assert torch.equal(cached.allowed(7, guide, tuple(tokens[:2])), Guides(
        engine.tokenizer.json_text, engine.model.config.vocab_size, engine.eos_token_ids).allowed(0, guide,
                                                                                                tuple(tokens[:2])))
    done = cached.allowed(7, guide, tuple(tokens))
    assert done.nonzero().flatten().tolist() == list(engine.eos_token_ids)  # complete: only end-of-sequence


@pytest.mark.parametrize("guide, needle", [(("json_schema", "{not json"), "json_schema"),
                                           (("regex", "([a-z"), "regex"), (("choice", "[]"), "non-empty"),
                                           (("grammar", "start: ("), "grammar")])
def test_bad_guides_are_refused(guide, needle):
    with pytest.raises(GuideError, match=needle):
        check_guide(guide)


def test_guides_need_a_kind_and_a_tokenizer():
    with pytest.raises(SamplingParamsError, match="guide"):
        SamplingParams(guide=("xml", ""))
    with pytest.raises(RequestError, match="tokenizer"):
        Scheduler(4, 64).add(Request("r", [1, 2], SamplingParams(guide=("regex", "a"))))
