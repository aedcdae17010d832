"""generation_config.json: end-of-sequence ids join config.json's (the engines stop at
them), sampling defaults fill the fields a request leaves out, a bad file is refused by
field; the chat template file and a request's template variables."""

from __future__ import annotations

import json

import pytest

from tests.tiny_models import save_char_tokenizer, save_tiny_model
from raymoe.deploy import openai_api as api
from raymoe.deploy.chat import ChatRenderer, ChatTemplateError
from raymoe.deploy.completions import _limits
from raymoe.workers.generation_config import GenerationDefaults, load_generation_config
from raymoe.workers.model.errors import CheckpointError, ConfigFieldError
from raymoe.workers.reference import ReferenceEngine, eos_ids
from raymoe.workers.sampling import SamplingParams
from raymoe.workers.tokenizer import Tokenizer


def test_a_checkpoint_without_the_file_has_no_defaults(tmp_path):
    assert load_generation_config(tmp_path) == GenerationDefaults()
    assert GenerationDefaults().sampling() == {}


def test_the_file_is_read_with_its_eos_list_and_sampling_fields(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [7, 9], "temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True}))
    got = load_generation_config(tmp_path)
    assert got.eos_token_ids == (7, 9) and got.sampling() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert eos_ids((1,), None, 96, got.eos_token_ids) == (1, 7, 9)
    assert eos_ids((7,), None, 8, got.eos_token_ids) == (7,)  # 9 is outside the vocabulary


@pytest.mark.parametrize("data, field", [
    ({"eos_token_id": "x"}, "eos_token_id"), ({"eos_token_id": [1, -2]}, "eos_token_id"),
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 1.5}, "top_k"),
    ({"temperature": True}, "temperature"),
])
def test_a_bad_field_is_refused_by_name(tmp_path, data, field):
    (tmp_path / "generation_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigFieldError, match=field) as caught:
        load_generation_config(tmp_path)
    assert caught.value.field == field
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_generation_config(tmp_path)


def test_requests_override_the_checkpoint_defaults_field_by_field():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    left_out = api.CompletionRequest(model="m", prompt="x")
    assert (lambda L: (L.temperature, L.top_p, L.top_k))(_limits(left_out, 4, defaults)) == (0.6, 0.9, 20)
    assert (lambda L: (L.temperature, L.top_p, L.top_k))(_limits(left_out, 4, {})) == \
        (api.DEFAULT_TEMPERATURE, 1.0, 0)
    sent = api.CompletionRequest(model="m", prompt="x", temperature=0, top_p=1.0, top_k=-1)
    assert (lambda L: (L.temperature, L.top_p, L.top_k))(_limits(sent, 4, defaults)) == (0, 1.0, 0)


def test_the_engine_stops_at_an_eos_id_of_the_generation_config(tmp_path):
    """Greedy tokens of a tiny model; with its 4th token listed in generation_config.json
    the same generation ends there with reason "stop"."""
    save_tiny_model("mixtral", tmp_path, seed=3)
    prompt, params = [5, 17, 33], SamplingParams(max_new_tokens=12)
    (free,) = ReferenceEngine.from_pretrained(tmp_path, max_seqs=1).generate_ids([prompt], params)
    stop = free.output_ids[3]
    first = free.output_ids.index(stop)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop]}))
    (ended,) = ReferenceEngine.from_pretrained(tmp_path, max_seqs=1).generate_ids([prompt], params)
    assert ended.output_ids == free.output_ids[:first + 1] and ended.finish_reason == "stop"


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    save_char_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(tmp_path)
    assert tok.chat_template_file is None
    assert ChatRenderer(tok.config).render([{"role": "user", "content": "hi"}]) == "[hi]"
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if enable_thinking %}<think>{% endif %}")
    tok = Tokenizer(tmp_path)
    renderer = ChatRenderer(tok.config, False, tok.chat_template_file)
    assert renderer.source == "checkpoint chat_template.jinja"
    assert renderer.render([{"role": "user", "content": "hi"}]) == "<user>hi"
    assert renderer.render([{"role": "user", "content": "hi"}], {"enable_thinking": True}) == "<user>hi<think>"
    with pytest.raises(ChatTemplateError, match="may not set 'messages'"):
        renderer.render([{"role": "user", "content": "hi"}], {"messages": []})
