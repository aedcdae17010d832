"""Hostile input, generated: hypothesis strategies over every request field of the live
HTTP and gRPC APIs, and over raw bodies. Never a 5xx (HTTP) nor INTERNAL/UNKNOWN (gRPC);
every HTTP refusal is an OpenAI error object naming the field at fault; the server answers
a good request afterwards.

Values: integers far past int64 (2**70), 1e308, NaN and Infinity (Python's JSON literals),
negatives, unpaired UTF-16 surrogates (``"\\ud800"`` is legal JSON, not Unicode), emoji,
NUL, strings of random Unicode, wrong types, nested lists and objects. Raw bodies: random
bytes, invalid UTF-8, deep nesting, wrong Content-Types, empty bodies, a chunked body past
the size limit. Bounded: ``EXAMPLES`` per test and small token budgets for the requests
that reach the model.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections import Counter

import grpc
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raymoe.deploy.grpc_stubs import RaymoeServiceStub
from raymoe.deploy.grpc_stubs import raymoe_pb2 as pb
from tests.e2e.conftest import CONTEXT

EXAMPLES = 60
EXAMPLES_PER_FIELD = 20
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
SMALL = 4  # tokens a fuzzed request that reaches the model may generate
GOOD = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
ERROR_KEYS = {"message", "type", "param", "code"}

# -- values -------------------------------------------------------------------------------
HUGE = st.sampled_from([2**63, 2**64, 2**70, -(2**70), 10**30, 1e308, -1e308, 5e-324])
SPECIAL_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0])
NUMBERS = st.one_of(st.integers(-(2**80), 2**80), st.floats(allow_nan=True, allow_infinity=True), HUGE,
                    SPECIAL_FLOATS, st.integers(-3, 20))
SURROGATES = st.characters(categories=["Cs"])  # lone halves of UTF-16 pairs
NASTY_CHARS = st.one_of(st.characters(), SURROGATES, st.sampled_from(["\x00", "\U0001F600", "\u202e", "\ufeff"]))
TEXTS = st.one_of(st.text(NASTY_CHARS, max_size=40), st.sampled_from(["", "tiny-chat", "hi", "x" * 200]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXTS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(TEXTS, inner, max_size=3)), max_leaves=8)

# Per field, hostile values of the right JSON type (these reach the checks past pydantic's
# types: a surrogate in a prompt, a NaN temperature, 2**70 as max_tokens), mixed with
# values of any type.
SPECIAL_CHARS = ["\ud800", "\udfff", "\ud83d", "\x00", "\U0001F600", "\u202e", "\ufeff", "\uffff"]
HOSTILE_TEXT = st.builds(lambda head, char, tail: head + char + tail, st.text(NASTY_CHARS, max_size=20),
                         st.sampled_from(SPECIAL_CHARS), st.text(max_size=20))  # one special character at least
HOSTILE_INT = st.one_of(HUGE.filter(lambda v: isinstance(v, int)), st.integers(-5, 130))
HOSTILE_FLOAT = st.one_of(SPECIAL_FLOATS, HUGE, st.floats(-3, 3))
PROMPTS = st.one_of(HOSTILE_TEXT, st.lists(HOSTILE_TEXT, max_size=3), st.lists(HOSTILE_INT, max_size=5),
                    st.lists(st.lists(HOSTILE_INT, max_size=3), max_size=2))
ROLES = st.sampled_from(["user", "system", "assistant", "developer"])
TEXT_PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": HOSTILE_TEXT}), min_size=1, max_size=2)
WELL_FORMED_MESSAGES = st.lists(st.fixed_dictionaries(  # past pydantic: to the template and the tokenizer
    {"role": ROLES, "content": st.one_of(HOSTILE_TEXT, TEXT_PARTS)}, optional={"name": HOSTILE_TEXT}),
    min_size=1, max_size=2)
ANY_MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.one_of(ROLES, VALUES)}, optional={"content": st.one_of(HOSTILE_TEXT, TEXT_PARTS, VALUES),
                                                  "name": st.one_of(HOSTILE_TEXT, VALUES)}), max_size=3)
MESSAGES = st.one_of(WELL_FORMED_MESSAGES, ANY_MESSAGES)
TYPED = {
    "model": HOSTILE_TEXT, "prompt": PROMPTS, "messages": MESSAGES, "user": HOSTILE_TEXT, "suffix": HOSTILE_TEXT,
    "stop": st.one_of(HOSTILE_TEXT, st.lists(HOSTILE_TEXT, max_size=5)), "stop_token_ids": st.lists(HOSTILE_INT),
    "logit_bias": st.dictionaries(HOSTILE_TEXT, HOSTILE_FLOAT, max_size=2),
    "stream_options": st.fixed_dictionaries({"include_usage": VALUES}),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
                                             optional={"json_schema": st.one_of(VALUES, st.fixed_dictionaries(
                                                 {"name": HOSTILE_TEXT, "schema": st.dictionaries(
                                                     HOSTILE_TEXT, VALUES, max_size=3)}))}),
    "guided_json": st.one_of(HOSTILE_TEXT, st.dictionaries(st.sampled_from(["type", "properties", "enum", "pattern"]),
                                                           VALUES, max_size=3)),
    "guided_regex": HOSTILE_TEXT, "guided_grammar": HOSTILE_TEXT,
    "guided_choice": st.lists(HOSTILE_TEXT, max_size=3),
    **dict.fromkeys(["max_tokens", "n", "seed", "top_k", "logprobs", "best_of", "max_completion_tokens",
                     "top_logprobs"], HOSTILE_INT),
    **dict.fromkeys(["temperature", "top_p", "presence_penalty", "frequency_penalty"], HOSTILE_FLOAT),
}
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
                     "stop", "seed", "user", "presence_penalty", "frequency_penalty", "logit_bias", "top_k",
                     "ignore_eos", "stop_token_ids", "echo", "logprobs", "best_of", "suffix", "no_such_field",
                     "guided_json", "guided_regex", "guided_choice", "guided_grammar"]
CHAT_FIELDS = [f for f in COMPLETION_FIELDS if f not in ("prompt", "echo", "best_of", "suffix")] + [
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice"]


def field_values(field: str):
    """Values for ``field``: two thirds hostile values of its type, one third any value."""
    typed = TYPED.get(field, VALUES)
    return st.one_of(typed, typed, VALUES)


def _dumps(body) -> bytes:
    """JSON as a client could send it: NaN/Infinity literals, surrogates as \\u escapes."""
    return json.dumps(body, allow_nan=True, ensure_ascii=True).encode()


def _tame(body: dict) -> dict:
    """Keep requests that reach the model quick: a small token budget, at most 2 choices."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and SMALL < value < CONTEXT:
            body[key] = SMALL
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and 2 < body["n"] <= 16:
        body["n"] = 2
    return body


# -- checks -------------------------------------------------------------------------------
def _post(server, route: str, data: bytes, content_type: str | None = "application/json") -> requests.Response:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return requests.post(f"{server.openai_base}/{route}", data=data, headers=headers, timeout=60)


def _error(response: requests.Response) -> dict:
    """The OpenAI error object of a 4xx."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], error
    return error


def _check(response: requests.Response, field: str | None = None) -> int:
    """Never a 5xx; a 200 is a whole response (or a stream ending in [DONE]); a 4xx is an
    error object whose ``param`` names ``field`` (or a part of it) when one is given.
    Returns the status."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        else:
            assert response.json()["choices"], response.text[:300]
        return 200
    error = _error(response)
    if field is not None and response.status_code in (400, 404):
        param = error["param"]
        ok = param == field or (param or "").startswith(field + ".") or (field == "max_completion_tokens"
                                                                          and param == "max_tokens")
        assert ok, (field, error)
    return response.status_code


def _still_serving(server) -> None:
    ok = requests.post(f"{server.openai_base}/completions", json=GOOD, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1, ok.text


# -- HTTP: one hostile field at a time ------------------------------------------------------
PER_FIELD = settings(FUZZ, max_examples=EXAMPLES_PER_FIELD)


FIELD_CASES = [("completions", GOOD, f) for f in COMPLETION_FIELDS] + [("chat/completions", CHAT, f) for f in CHAT_FIELDS]


@pytest.mark.slow
@pytest.mark.parametrize("route,good,field", FIELD_CASES, ids=[f"{r}:{f}" for r, _, f in FIELD_CASES])
def test_request_field_fuzzed(server, route, good, field):
    @PER_FIELD
    @given(value=field_values(field), stream=st.booleans())
    def fuzz(value, stream):
        body = _tame({**good, "stream": stream, field: value})
        _check(_post(server, route, _dumps(body)), field)

    fuzz()
    _still_serving(server)


# -- HTTP: raw bodies ---------------------------------------------------------------------
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", None, "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                                 "application/vnd.api+json", "\u00e9/\u00e9"])


def _nested(depth: int, opener: str) -> bytes:
    closer = {"[": "]", "{\"a\":": "}"}[opener]
    return (opener * depth + "1" + closer * depth).encode()


RAW_BODIES = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda good, cut: good[:cut], st.just(_dumps(GOOD)), st.integers(0, len(_dumps(GOOD)))),
    st.builds(lambda depth, opener: _nested(depth, opener), st.integers(1, 20000), st.sampled_from(["[", "{\"a\":"])),
    st.builds(lambda junk: _dumps(GOOD)[:-1] + b', "prompt": "' + junk + b'"}', st.binary(max_size=20)),
    st.sampled_from([b"", b"NaN", b"Infinity", b"-Infinity", b"null", b"true", b"[]", b"{}", b"\"\\ud800\"",
                     b"\xef\xbb\xbf", b"1" * 5000]),
)


@pytest.mark.slow
def test_raw_bodies_get_client_errors(server):
    @FUZZ
    @given(route=st.sampled_from(["completions", "chat/completions"]), data=RAW_BODIES, content_type=CONTENT_TYPES)
    def fuzz(route, data, content_type):
        response = _post(server, route, data, content_type)
        _check(response)
        if response.status_code != 200:  # a truncation of GOOD can still be GOOD (as text/plain: refused)
            assert 400 <= response.status_code < 500

    fuzz()
    _still_serving(server)


def test_model_path_fuzzed(server):
    @FUZZ
    @given(name=st.one_of(st.text(NASTY_CHARS.filter(lambda c: not 0xD800 <= ord(c) <= 0xDFFF), min_size=1,
                                  max_size=60),
                          st.binary(min_size=1, max_size=20).map(lambda b: urllib.parse.quote_from_bytes(b))))
    def fuzz(name):
        quoted = name if "%" in name else urllib.parse.quote(name.encode(), safe="")
        response = requests.get(f"{server.openai_base}/models/{quoted}", timeout=30)
        assert response.status_code < 500, response.text[:300]
        if response.status_code == 200:
            assert response.json()["id"] == server.model
        else:
            assert response.status_code in (404, 405) and _error(response), response.text[:300]

    fuzz()
    assert requests.get(f"{server.openai_base}/models/{server.model}", timeout=30).status_code == 200


# -- HTTP: the named hostile inputs, each with its status and field -------------------------
NAMED = [
    ("1 MB prompt", "completions", _dumps({**GOOD, "prompt": "x" * (1 << 20)}), 400, "prompt"),
    ("1 MB chat message", "chat/completions",
     _dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}), 400, "messages"),
    ("10000 levels of [", "completions", b"[" * 10000 + b"]" * 10000, 400, None),
    ("10000-level prompt", "completions", b'{"model": "tiny-chat", "prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}",
     400, None),
    ("invalid UTF-8", "completions", b'{"model": "tiny-chat", "prompt": "\xff\xfe\xed"}', 400, None),
    ("5000-digit integer", "completions", b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": 1' + b"0" * 5000
     + b"}", 400, None),
    ("NaN temperature", "completions", _dumps({**GOOD, "temperature": math.nan}), 400, "temperature"),
    ("Infinity top_p", "completions", _dumps({**GOOD, "top_p": math.inf}), 400, "top_p"),
    ("2**70 max_tokens", "completions", _dumps({**GOOD, "max_tokens": 2**70}), 400, "max_tokens"),
    ("2**70 seed", "completions", _dumps({**GOOD, "seed": 2**70}), 400, "seed"),
    ("2**70 token id", "completions", _dumps({**GOOD, "prompt": [2**70]}), 400, "prompt"),
    ("1e308 max_tokens", "completions", _dumps({**GOOD, "max_tokens": 1e308}), 400, "max_tokens"),
    ("negative n", "completions", _dumps({**GOOD, "n": -5}), 400, "n"),
    ("surrogate prompt", "completions", _dumps({**GOOD, "prompt": "ok\ud800"}), 400, "prompt"),
    ("surrogate in prompt list", "completions", _dumps({**GOOD, "prompt": ["ok", "\udfff"]}), 400, "prompt"),
    ("surrogate chat content", "chat/completions",
     _dumps({**CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\ud83d"}]}), 400,
     "messages.1.content"),
    ("surrogate text part", "chat/completions",
     _dumps({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}), 400,
     "messages.0.content"),
    ("emoji and NUL", "completions", _dumps({**GOOD, "prompt": "a\x00b\U0001F600"}), 200, None),
]


@pytest.mark.parametrize("name,route,data,status,param", NAMED, ids=[n[0] for n in NAMED])
def test_named_hostile_input(server, name, route, data, status, param):
    response = _post(server, route, data)
    assert response.status_code == status, response.text[:500]
    if status != 200:
        error = _error(response)
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert "error parsing the body" not in error["message"], error  # says what is wrong with it


def test_chunked_body_past_the_limit_gets_413(server):
    """No Content-Length to check up front: the body is counted as it arrives."""
    def chunks():
        for _ in range(9):
            yield b" " * (1 << 20)

    response = requests.post(f"{server.openai_base}/completions", data=chunks(),
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413, response.text[:300]
    assert _error(response)["code"] == "request_too_large"
    _still_serving(server)


# -- gRPC ---------------------------------------------------------------------------------
FLOAT32 = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), SPECIAL_FLOATS.map(float),
                    st.floats(0, 1, width=32, exclude_min=True))
UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 8))
VALID_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)  # protobuf strings are UTF-8
REQUESTS = st.fixed_dictionaries(
    {"prompt": st.one_of(st.just("hello"), VALID_TEXT, st.just("x" * (CONTEXT + 5)))},
    optional={"model": st.one_of(st.just(""), st.just("tiny-chat"), VALID_TEXT),
              "prompt_ids": st.lists(UINT32, max_size=6),
              "max_tokens": UINT32, "temperature": FLOAT32, "top_p": FLOAT32, "top_k": UINT32,
              "seed": st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 10)),
              "stop": st.lists(VALID_TEXT, max_size=6), "ignore_eos": st.booleans()})
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield RaymoeServiceStub(channel)


def _grpc_tame(fields: dict) -> dict:
    if fields.get("max_tokens", 0) > SMALL and fields["max_tokens"] < CONTEXT:
        fields["max_tokens"] = SMALL
    if "max_tokens" not in fields and fields.get("ignore_eos"):
        fields["max_tokens"] = SMALL
    return fields


@pytest.mark.slow
def test_grpc_requests_fuzzed(server, stub):
    codes = Counter()

    @FUZZ
    @given(fields=REQUESTS, streaming=st.booleans())
    def fuzz(fields, streaming):
        request = pb.GenerateRequest(**_grpc_tame(fields))
        try:
            if streaming:
                chunks = list(stub.GenerateStream(request, metadata=server.grpc_metadata(), timeout=60))
                assert chunks and chunks[-1].finish_reason, chunks
            else:
                assert stub.Generate(request, metadata=server.grpc_metadata(), timeout=60).finish_reason
            codes[grpc.StatusCode.OK.name] += 1
        except grpc.RpcError as exc:
            assert exc.code() in REFUSALS, (exc.code(), exc.details(), fields)
            assert exc.details(), fields
            codes[exc.code().name] += 1

    fuzz()
    print(f"\n[fuzz] gRPC: {dict(codes)}")
    assert codes["OK"] and codes["INVALID_ARGUMENT"]
    assert stub.Generate(pb.GenerateRequest(prompt="ok", max_tokens=2), metadata=server.grpc_metadata(),
                         timeout=60).token_ids


GRPC_NAMED = [({"prompt": "hi", "temperature": math.nan}, "temperature"), ({"prompt": "hi", "top_p": math.inf}, "top_p"),
              ({"prompt": "hi", "seed": 2**64 - 1}, "seed"), ({"prompt_ids": [2**32 - 1]}, "prompt"),
              ({"prompt": "hi", "max_tokens": 2**32 - 1}, "max_tokens"), ({"prompt": "x" * (1 << 20)}, "prompt"),
              ({"prompt": "hi", "stop": ["a"] * 5}, "stop"), ({"prompt": "hi", "stop": [""]}, "stop")]


@pytest.mark.parametrize("fields,needle", GRPC_NAMED, ids=[n for _, n in GRPC_NAMED])
def test_grpc_named_hostile_fields(server, stub, fields, needle):
    for call in (stub.Generate, lambda *a, **k: list(stub.GenerateStream(*a, **k))):
        with pytest.raises(grpc.RpcError) as info:
            call(pb.GenerateRequest(**fields), metadata=server.grpc_metadata(), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, info.value.details())
        assert needle in info.value.details(), (fields, info.value.details())


@pytest.mark.parametrize("raw", [
    pb.GenerateRequest(prompt="abc", max_tokens=2).SerializeToString().replace(b"abc", b"a\xff\xfe"),  # not UTF-8
    pb.GenerateRequest(prompt="abcdef", max_tokens=2).SerializeToString()[:4],  # truncated
    b"\xff" * 7,  # not protobuf at all
], ids=["invalid-utf8", "truncated", "garbage"])
def test_grpc_undecodable_bytes_are_invalid_argument(server, raw):
    """Bytes a stub cannot build, sent raw: grpcio's parser raised (UNKNOWN) before the fix."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        for call in (channel.unary_unary("/raymoe.RaymoeService/Generate"),
                     lambda *a, **k: list(channel.unary_stream("/raymoe.RaymoeService/GenerateStream")(*a, **k))):
            with pytest.raises(grpc.RpcError) as info:
                call(raw, metadata=server.grpc_metadata(), timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "not a valid GenerateRequest" in info.value.details()


def _splice(data: bytes, at: int, junk: bytes) -> bytes:
    at %= len(data) + 1
    return data[:at] + junk + data[at + len(junk):]


RAW_REQUESTS = st.one_of(
    st.binary(max_size=60),
    st.builds(_splice, st.just(pb.GenerateRequest(prompt="hello", max_tokens=2, temperature=0.5).SerializeToString()),
              st.integers(0, 40), st.binary(min_size=1, max_size=4)),
)


@pytest.mark.slow
def test_grpc_raw_bytes_fuzzed(server):
    """Random and corrupted request bytes: a reply, or a refusal, never UNKNOWN or INTERNAL."""
    codes = Counter()
    with grpc.insecure_channel(server.grpc_target) as channel:
        generate = channel.unary_unary("/raymoe.RaymoeService/Generate")

        @FUZZ
        @given(raw=RAW_REQUESTS)
        def fuzz(raw):
            try:
                generate(raw, metadata=server.grpc_metadata(), timeout=60)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                assert exc.code() in REFUSALS, (exc.code(), exc.details(), raw)
                codes[exc.code().name] += 1

        fuzz()
    print(f"\n[fuzz] gRPC raw bytes: {dict(codes)}")
    assert codes["INVALID_ARGUMENT"]
