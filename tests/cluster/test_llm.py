"""The public Python API, ``from raymoe import LLM, SamplingParams``: the reference engine and
deployments on Ray behind one class, token for token the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymoe import LLM, SamplingParams
from raymoe.cluster.config import DeploymentConfigError

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny-moe"
CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "tiny.yaml"
PROMPTS = ["def fibonacci(n):", "import os\n"]
GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def reference():
    with LLM(TINY) as llm:
        yield llm.generate(PROMPTS, GREEDY)


def test_reference_engine_prompts_of_every_shape(reference):
    with LLM(TINY, max_seqs=4) as llm:
        ids = llm.tokenizer.encode(PROMPTS[0])
        assert llm.generate(PROMPTS[0], GREEDY)[0].output_ids == reference[0].output_ids
        assert llm.generate(ids, GREEDY)[0].output_ids == reference[0].output_ids
        assert [c.text for c in llm.generate([ids, llm.tokenizer.encode(PROMPTS[1])], GREEDY)] == \
            [c.text for c in reference]
        per_prompt = llm.generate(PROMPTS, [GREEDY, SamplingParams(max_new_tokens=3)])
        assert len(per_prompt[1].output_ids) == 3
        with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
            llm.generate(PROMPTS[:1], [GREEDY, GREEDY])
        with pytest.raises(TypeError, match="not a mix"):
            llm.generate([ids, PROMPTS[1]], GREEDY)


@pytest.mark.parametrize("kwargs", [{"expert_ranks": 2}, {"expert_ranks": 2, "layout": "coherent"},
                                    {"config": CONFIG}])
def test_on_ray_the_same_tokens_as_the_reference(ray_session, reference, kwargs):
    with LLM(TINY, **kwargs) as llm:
        assert [c.output_ids for c in llm.generate(PROMPTS, GREEDY)] == [c.output_ids for c in reference]


def test_bad_arguments_are_typed_errors():
    with pytest.raises(TypeError, match="model directory"):
        LLM()
    with pytest.raises(DeploymentConfigError, match="dtype"):
        LLM(TINY, dtype="float64")
    with pytest.raises(DeploymentConfigError, match="expert_ranks"):
        LLM(TINY, expert_ranks=0)
