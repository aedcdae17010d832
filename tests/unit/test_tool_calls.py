"""Tool calls (issue 18 item 4): the Hermes parser, the guide of ``required`` and named
calls (valid against each tool's schema by construction, on the shipped model), and the
streamed reader that never sends a half-open call block as content."""

from __future__ import annotations

import json

import jsonschema
import pytest

from raymoe.deploy import openai_api as api
from raymoe.deploy.completions import ToolStream
from raymoe.deploy.tool_calls import Call, forced_calls, forced_guide, held_back, hermes
from raymoe.workers.guided import check_guide
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams
from tests.paths import ROOT

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [api.Tool(type="function", function=api.FunctionDefinition(name="weather", parameters=WEATHER)),
         api.Tool(type="function", function=api.FunctionDefinition(name="time", parameters=TIME))]


@pytest.mark.parametrize("text, content, calls", [
    ("no calls here", "no calls here", []),
    ('<tool_call>{"name": "time", "arguments": {"zone": "UTC"}}</tool_call>', None,
     [Call("time", '{"zone": "UTC"}')]),
    ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\nand\n'
     '<tool_call>{"name": "b", "parameters": {"x": 1}}</tool_call>', "Let me check.\n\nand",
     [Call("a", "{}"), Call("b", '{"x": 1}')]),
    ('<tool_call>{not json}</tool_call>', '<tool_call>{not json}</tool_call>', []),
    ('<tool_call>["a list"]</tool_call>', '<tool_call>["a list"]</tool_call>', []),
])
def test_hermes_blocks(text, content, calls):
    assert hermes(text) == (content, calls)


def test_a_half_open_block_is_held_back():
    assert held_back("the answer <tool") == 5 and held_back("x <") == 1 and held_back("x >") == 0
    stream = ToolStream("auto")
    pieces = ["Sure", ". <tool", '_call>{"name": "time", ', '"arguments": {"zone": "CET"}}</tool_call>']
    out = [d for i, p in enumerate(pieces) for d in stream.feed(p, "stop" if i == len(pieces) - 1 else None)]
    contents = "".join(d.get("content", "") for d, _ in out)
    assert contents == "Sure. " and "<" not in contents
    (calls,) = [d["tool_calls"] for d, _ in out if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["function"] == {"name": "time", "arguments": '{"zone": "CET"}'}
    assert out[-1] == ({}, "tool_calls")
    plain = ToolStream("auto")
    assert plain.feed("a <to", None) == [({"content": "a "}, None)] and plain.feed("", "length") == [
        ({"content": "<to"}, None), ({}, "length")]  # not a call after all: the held text goes out


@pytest.fixture(scope="module")
def engine():
    return ReferenceEngine.from_pretrained(ROOT / "models" / "tiny-moe", max_seqs=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_and_named_calls_are_valid_by_construction(engine, seed):
    schemas = {"weather": WEATHER, "time": TIME}
    required = forced_guide(TOOLS, "required")
    named = forced_guide(TOOLS, api.NamedToolChoice(type="function", function=api.NamedFunction(name="weather")))
    for guide in (required, named):
        check_guide(guide)
    params = [SamplingParams(max_new_tokens=400, temperature=1.0, seed=seed, guide=g) for g in (required, named)]
    out = engine.generate(["def call():", "def call():"], params)
    assert all(c.finish_reason == "stop" for c in out)
    calls = forced_calls(out[0].text, "required")
    assert calls and all(c.name in schemas for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), schemas[c.name])
    (call,) = forced_calls(out[1].text, api.NamedToolChoice(type="function",
                                                             function=api.NamedFunction(name="weather")))
    assert call.name == "weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
