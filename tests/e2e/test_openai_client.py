"""The official ``openai`` package against a live server: completions, chat, streaming,
seeds, several choices, stop strings, usage. Greedy text is checked against the
single-process reference engine generating the same prompt alone."""

from __future__ import annotations

import openai
import pytest
from hypothesis import HealthCheck, given, settings

from tests.e2e.conftest import CHAT_TEMPLATE, alone
from tests.unit.test_guided import FLAT_SCHEMAS

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.openai_base, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model


def test_completion_is_the_reference_greedy_text_with_usage(client, server, reference):
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0)
    want = alone(reference, PROMPT, max_new_tokens=24)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].text == want.text
    assert out.choices[0].finish_reason == ("length" if len(want.output_ids) == 24 else "stop")
    assert out.usage.prompt_tokens == len(PROMPT)  # one token per character
    assert out.usage.completion_tokens == len(want.output_ids)
    assert out.usage.total_tokens == len(PROMPT) + len(want.output_ids)


def test_token_id_prompt_equals_text_prompt(client, server, reference):
    ids = reference.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=12, temperature=0)
    by_text = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_renders_the_checkpoint_template(client, server, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=16, temperature=0)
    assert "[assistant]" in CHAT_TEMPLATE
    prompt = "[system] be brief [user] hello [assistant]"
    want = alone(reference, prompt, max_new_tokens=16)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == len(want.output_ids)


def test_chat_template_kwargs_are_accepted_and_may_not_replace_the_servers_names(client, server):
    """The served template ignores unknown variables (same text, same prompt tokens: the
    unit tests render one that uses them);
    one that would replace ``messages`` is a 400 naming chat_template_kwargs."""
    messages = [{"role": "user", "content": "hello"}]
    plain = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0)
    extra = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert extra.choices[0].message.content == plain.choices[0].message.content
    assert extra.usage.prompt_tokens == plain.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=messages, max_tokens=8,
                                       extra_body={"chat_template_kwargs": {"messages": []}})
    assert info.value.body["param"] == "chat_template_kwargs" and "messages" in info.value.body["message"]


def test_streamed_completion_concatenates_to_the_greedy_text(client, server):
    whole = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0)
    stream = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len([c for c in chunks if c.choices]) > 2  # streamed piece by piece, not in one go
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streamed_chat_concatenates_to_the_greedy_text(client, server):
    messages = [{"role": "user", "content": "write a loop"}]
    whole = client.chat.completions.create(model=server.model, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=20,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_seed_makes_sampling_reproducible(client, server, reference):
    def sample(seed):
        return client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0.9,
                                         top_p=0.95, seed=seed).choices[0].text

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other
    assert first == alone(reference, PROMPT, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=7).text


def test_several_choices_and_prompts(client, server):
    out = client.completions.create(model=server.model, prompt=[PROMPT, "import os"], n=2, max_tokens=8,
                                    temperature=0.8, seed=3)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    single = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0.8, seed=3)
    assert out.choices[0].text == single.choices[0].text  # choice 0 of seed s is a request with seed s
    assert out.usage.prompt_tokens == len(PROMPT) + len("import os")
    streamed = client.completions.create(model=server.model, prompt=PROMPT, n=3, max_tokens=8, temperature=0,
                                         stream=True)
    texts = {}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 1  # greedy: the same text thrice


def test_stop_string_cuts_the_text_streamed_or_not(client, server):
    greedy = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[10:13]
    cut = greedy[: greedy.index(stop)]
    whole = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_penalties_and_logit_bias_over_the_api(client, server, reference):
    """OpenAI's presence/frequency penalties and logit_bias, and vLLM's repetition_penalty,
    min_p and min_tokens: each is the reference engine's text with the same parameters."""
    ids = reference.tokenizer.encode(PROMPT)
    forced = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0,
                                       logit_bias={str(ids[0]): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == reference.tokenizer.decode([ids[0]] * 5)
    params = dict(max_tokens=12, temperature=0, presence_penalty=0.7, frequency_penalty=1.2)
    extra = {"repetition_penalty": 1.5, "min_tokens": 4, "min_p": 0.05, "ignore_eos": True}
    got = client.completions.create(model=server.model, prompt=PROMPT, extra_body=extra, **params).choices[0].text
    want = alone(reference, PROMPT, max_new_tokens=12, presence_penalty=0.7, frequency_penalty=1.2,
                 repetition_penalty=1.5, min_tokens=4, min_p=0.05, ignore_eos=True)
    assert got == want.text


def _reference_logprobs(reference, prompt: str, tokens: int, top: int, **params):
    """The reference engine's logprobs of its greedy completion, and its logits' log-softmax
    at each step (for the check against the logits themselves)."""
    import torch

    from raymoe.workers.sampling import SamplingParams

    engine = reference
    rid = engine.add_request(reference.tokenizer.encode(prompt), SamplingParams(max_new_tokens=tokens, logprobs=top,
                                                                                 **params))
    scores, softmax = [], []
    while engine.has_work():
        step = engine.step(return_logits=True)
        if rid in step.logprobs:
            scores.append(step.logprobs[rid])
            softmax.append(torch.log_softmax(step.logits[rid], -1))
    return scores, softmax


def test_completion_logprobs_are_the_engines_log_softmax(client, server, reference):
    """``logprobs: 3``: per token the sampled token's logprob (the greedy one, so also the
    top one) and up to 4 alternatives (OpenAI adds the sampled token), each within 1e-5 of
    the log-softmax of the reference engine's own logits; streamed the same, with text
    offsets that follow the text."""
    want, softmax = _reference_logprobs(reference, PROMPT, 8, 3, ignore_eos=True)
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 8
    text_of = reference.tokenizer.token_text
    for got, top, entry, row in zip(lp.token_logprobs, lp.top_logprobs, want, softmax):
        assert got == pytest.approx(float(row[entry.token]), abs=1e-5)
        assert got == pytest.approx(float(row.max()), abs=1e-5)  # greedy: the sampled token is the most likely
        assert set(top) == {text_of(t) for t, _ in entry.top} and 1 <= len(top) <= 4
        assert sum(2.718281828 ** v for v in top.values()) <= 1 + 1e-5
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    streamed = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                         logprobs=3, stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [v for p in pieces for v in p.token_logprobs] == lp.token_logprobs
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset


def test_chat_logprobs_and_top_logprobs(client, server, reference):
    messages = [{"role": "user", "content": "hello"}]
    prompt = "[user] hello [assistant]"
    want, _ = _reference_logprobs(reference, prompt, 6, 2, ignore_eos=True)
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in want], abs=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(bytes(c.bytes).decode() == c.token for c in content)
    assert "".join(c.token for c in content) == out.choices[0].message.content
    plain = client.chat.completions.create(model=server.model, messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    streamed = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True,
                                              extra_body={"ignore_eos": True})
    got = [c.logprob for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
           for c in chunk.choices[0].logprobs.content]
    assert got == [c.logprob for c in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=server.model, messages=messages, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=server.model, messages=messages, max_tokens=2, logprobs=True,
                                       top_logprobs=21)


def test_echo_returns_the_prompt_and_its_logprobs(client, server, reference):
    """``echo`` with ``logprobs``: the text is the prompt's then the completion's; the
    prompt's tokens come first in the logprobs, the first without one, the others the
    reference engine's log-softmax at the position before them (1e-5); streamed, the
    prompt comes first, once it is computed."""
    import torch

    from raymoe.workers.model.batch import ForwardBatch

    ids = reference.tokenizer.encode(PROMPT)
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                    echo=True, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.inference_mode():
        want = torch.log_softmax(reference.model(ForwardBatch.build([ids], [0]), all_logits=True), -1)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([float(want[i, ids[i + 1]]) for i in range(len(ids) - 1)],
                                                          abs=1e-5)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 4
    plain = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0,
                                            logprobs=2, echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


def test_tokenize_detokenize_version_and_the_model_card(client, server, reference):
    """vLLM's small routes: /tokenize (a prompt, or messages through the chat template),
    /detokenize, /version, and the model card's max_model_len and root."""
    import httpx2 as httpx

    def post(path, body):
        return httpx.post(f"{server.base_url}{path}", json=body, headers=server.headers(), timeout=30)

    ids = reference.tokenizer.encode(PROMPT)
    got = post("/tokenize", {"model": server.model, "prompt": PROMPT, "return_token_strs": True}).json()
    assert got["tokens"] == ids and got["count"] == len(ids) and "".join(got["token_strs"]) == PROMPT
    assert got["max_model_len"] == client.models.retrieve(server.model).model_extra["max_model_len"]
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "hello"}]}).json()
    assert chat["tokens"] == reference.tokenizer.encode("[user] hello [assistant]") and chat["token_strs"] is None
    assert post("/detokenize", {"tokens": ids}).json() == {"prompt": PROMPT}
    assert post("/tokenize", {"prompt": PROMPT, "messages": [{"role": "user", "content": "x"}]}).status_code == 400
    bad = post("/detokenize", {"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert post("/tokenize", {"model": "gpt-4", "prompt": "x"}).status_code == 404
    version = httpx.get(f"{server.base_url}/version", headers=server.headers(), timeout=30).json()["version"]
    assert version and version != "unknown"
    card = client.models.retrieve(server.model).model_extra
    assert card["root"] == str(server.model_dir) and card["parent"] is None


def test_structured_output_over_the_api(client, server, reference):
    """``response_format`` json_schema (strict) and json_object, and vLLM's ``guided_*``
    extras: the text parses and validates, and equals the reference engine's with the same
    guide; a schema that does not compile, or two constraints at once, are 400s."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "size": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["name", "size"], "additionalProperties": False}
    messages = [{"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=60, temperature=0,
                                         response_format={"type": "json_schema", "json_schema": {
                                             "name": "thing", "schema": schema, "strict": True}})
    text = out.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    want = alone(reference, "[user] hello [assistant]", max_new_tokens=60, guide=("json_schema", json.dumps(schema)))
    assert text == want.text and out.choices[0].finish_reason == "stop"
    obj = client.chat.completions.create(model=server.model, messages=messages, max_tokens=60, temperature=0.9, seed=1,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10, temperature=0,
                                       extra_body={"guided_choice": ["up", "down"]})
    assert choice.choices[0].text in ("up", "down")
    regex = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10, temperature=0.7, seed=3,
                                      extra_body={"guided_regex": "[a-c]{4}"})
    assert len(regex.choices[0].text) == 4 and set(regex.choices[0].text) <= set("abc")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=server.model, messages=messages, max_tokens=5,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "object", "required": 5}}})
    with pytest.raises(openai.BadRequestError, match="one structured-output constraint"):
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5,
                                  extra_body={"guided_choice": ["a"], "guided_regex": "a"})


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4}},
                   "required": ["city"], "additionalProperties": False}}}


def test_a_tool_call_round_trip(client, server):
    """A named function: the call's arguments are valid JSON for its schema by
    construction; the call and the tool's answer go back into the history, rendered by
    the chat template, and the model answers. ``required`` makes at least one call; with
    ``auto`` the model's own Hermes-format text is parsed into calls (forced here with a
    regex, the tiny model never writes one), streamed or not."""
    import json

    messages = [{"role": "user", "content": "weather?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=40, temperature=0,
                                         tools=[WEATHER_TOOL], tool_choice=named)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = client.chat.completions.create(model=server.model, messages=history, max_tokens=5, temperature=0,
                                            tools=[WEATHER_TOOL])
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.tool_calls is None
    required = client.chat.completions.create(model=server.model, messages=messages, max_tokens=100, temperature=0,
                                              tools=[WEATHER_TOOL], tool_choice="required")
    # the tiny model repeats calls past the 128-token context (tests/unit/test_tool_calls.py checks
    # complete ones): the text is the guided array, cut, and holds no call
    (cut,) = required.choices
    assert cut.message.content.startswith('[{"name":"get_weather","parameters":{"city":"')
    assert cut.finish_reason == "length" and cut.message.tool_calls is None
    forced = r'Ok\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "Oslo"\}\}</tool_call>'
    auto = client.chat.completions.create(model=server.model, messages=messages, max_tokens=95, temperature=0,
                                          tools=[WEATHER_TOOL], extra_body={"guided_regex": forced})
    assert auto.choices[0].message.content == "Ok." and auto.choices[0].finish_reason == "tool_calls"
    assert json.loads(auto.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=95, temperature=0,
                                                 tools=[WEATHER_TOOL], extra_body={"guided_regex": forced},
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Ok. "
    (streamed,) = [t for d in deltas if d.tool_calls for t in d.tool_calls]
    assert streamed.function.name == "get_weather" and json.loads(streamed.function.arguments) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(model=server.model, messages=messages, max_tokens=95, temperature=0,
                                          tools=[WEATHER_TOOL], tool_choice="none", extra_body={"guided_regex": forced})
    assert none.choices[0].message.tool_calls is None and "<tool_call>" in none.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="not among"):
        client.chat.completions.create(model=server.model, messages=messages, max_tokens=5, tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model=server.model, max_tokens=5,
                                       messages=[{"role": "tool", "content": "x"}])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=FLAT_SCHEMAS)
def test_json_schema_outputs_validate_over_http(client, server, schema):
    """20 random JSON schemas (tests/unit/test_guided.py's flat ones: the served context is
    128 characters), as ``response_format`` json_schema with the official client: the text
    parses and validates."""
    import json

    import jsonschema

    out = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "data"}],
                                         max_tokens=90, temperature=0,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "s", "schema": schema}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
