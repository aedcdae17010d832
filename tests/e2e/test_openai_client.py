"""The official ``openai`` package against a live server: completions, chat, streaming,
seeds, several choices, stop strings, usage. Greedy text is checked against the
single-process reference engine generating the same prompt alone."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import CHAT_TEMPLATE, alone

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
