"""A gRPC client (stubs generated from deploy/raymoe.proto) through Ray Serve's gRPC
proxy: unary and streaming give the HTTP API's text; refusals carry gRPC status codes."""

from __future__ import annotations

import grpc
import httpx2 as httpx
import pytest

from raymoe.deploy.grpc_stubs import RaymoeServiceStub
from raymoe.deploy.grpc_stubs import raymoe_pb2 as pb
from tests.e2e.conftest import GUARDED_KEY

PROMPT = "class Stack:"


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield RaymoeServiceStub(channel)


def _http_text(server, **body) -> dict:
    r = httpx.post(f"{server.openai_base}/completions", json={"model": server.model, **body}, timeout=60,
                   headers=server.headers())
    assert r.status_code == 200, r.text
    return r.json()


def test_unary_and_streaming_give_the_http_text(server, stub):
    http = _http_text(server, prompt=PROMPT, max_tokens=20, temperature=0)
    request = pb.GenerateRequest(model=server.model, prompt=PROMPT, max_tokens=20)  # temperature defaults to 0
    unary = stub.Generate(request, metadata=server.grpc_metadata(), timeout=60)
    assert unary.text == http["choices"][0]["text"]
    assert unary.finish_reason == http["choices"][0]["finish_reason"]
    assert unary.usage.prompt_tokens == http["usage"]["prompt_tokens"]
    assert unary.usage.completion_tokens == len(unary.token_ids) == http["usage"]["completion_tokens"]

    chunks = list(stub.GenerateStream(request, metadata=server.grpc_metadata(), timeout=60))
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == unary.finish_reason and chunks[-1].usage.total_tokens == unary.usage.total_tokens
    assert all(not c.finish_reason for c in chunks[:-1])


def test_seeded_sampling_and_token_id_prompts(server, stub):
    ids = [ord(ch) - 32 for ch in PROMPT]  # the character tokenizer
    seeded = dict(max_tokens=12, temperature=0.9, seed=5)
    by_ids = stub.Generate(pb.GenerateRequest(prompt_ids=ids, **seeded), metadata=server.grpc_metadata(), timeout=60)
    http = _http_text(server, prompt=PROMPT, **seeded)
    assert by_ids.text == http["choices"][0]["text"]


def test_penalties_bias_and_logprobs_as_over_http(server, stub):
    """The sampling controls and logprobs of the HTTP API, in the proto: the same text and
    the same logprobs (float32 on the wire), unary and streamed."""
    fields = dict(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.3, min_p=0.05, min_tokens=3)
    http = _http_text(server, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2, logit_bias={"40": 5.0},
                      stop_token_ids=[1], **fields)
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=10, logprobs=2, logit_bias={40: 5.0}, stop_token_ids=[1],
                                 **fields)
    unary = stub.Generate(request, metadata=server.grpc_metadata(), timeout=60)
    want = http["choices"][0]
    assert unary.text == want["text"]
    assert [e.logprob for e in unary.logprobs] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-6)
    assert [e.token for e in unary.logprobs] == want["logprobs"]["tokens"]
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
               for e in unary.logprobs)
    chunks = list(stub.GenerateStream(request, metadata=server.grpc_metadata(), timeout=60))
    assert [e.logprob for c in chunks for e in c.logprobs] == [e.logprob for e in unary.logprobs]
    plain = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=3), metadata=server.grpc_metadata(), timeout=60)
    assert len(plain.logprobs) == 0


def test_structured_output_over_grpc(server, stub):
    """The ``guided_*`` fields as over HTTP: a JSON schema, a regex, a choice; a bad one is
    INVALID_ARGUMENT naming the field."""
    import json
    import re

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 50}},
              "required": ["n"], "additionalProperties": False}
    meta = dict(metadata=server.grpc_metadata(), timeout=60)
    got = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=30, guided_json=json.dumps(schema)), **meta)
    assert json.loads(got.text)["n"] in range(51)
    http = _http_text(server, prompt=PROMPT, max_tokens=30, temperature=0, guided_json=schema)
    assert got.text == http["choices"][0]["text"]
    regex = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=10, guided_regex="[xyz]{3}"), **meta)
    assert re.fullmatch("[xyz]{3}", regex.text)
    choice = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=10, guided_choice=["on", "off"]), **meta)
    assert choice.text in ("on", "off")
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=5, guided_regex="(a"), **meta)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "guided_regex" in info.value.details()


@pytest.mark.parametrize("request_fields,code,needle", [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "'prompt' is empty"),
    (dict(prompt="x", prompt_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    (dict(prompt="x", max_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT, "context window"),
    (dict(prompt="x", temperature=7.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt_ids=[5, 10_000]), grpc.StatusCode.INVALID_ARGUMENT, "10000"),
    (dict(prompt="x", model="gpt-4"), grpc.StatusCode.NOT_FOUND, "gpt-4"),
    (dict(prompt="x", logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    (dict(prompt="x", repetition_penalty=0.0), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty"),
    (dict(prompt="x", logit_bias={5000: 1.0}), grpc.StatusCode.INVALID_ARGUMENT, "logit_bias"),
])
def test_bad_requests_get_status_codes(server, stub, request_fields, code, needle):
    for call in (stub.Generate, lambda *a, **k: list(stub.GenerateStream(*a, **k))):
        with pytest.raises(grpc.RpcError) as info:
            call(pb.GenerateRequest(**request_fields), metadata=server.grpc_metadata(), timeout=60)
        assert info.value.code() == code and needle in info.value.details()
    ok = stub.Generate(pb.GenerateRequest(prompt="ok", max_tokens=2), metadata=server.grpc_metadata(), timeout=60)
    assert len(ok.token_ids) >= 1  # and the server keeps serving


def test_api_key_is_required_over_grpc_too(guarded_server):
    with grpc.insecure_channel(guarded_server.grpc_target) as channel:
        stub = RaymoeServiceStub(channel)
        request = pb.GenerateRequest(prompt="hi", max_tokens=3)
        for key in ("", "wrong-key"):
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(request, metadata=guarded_server.grpc_metadata(key) if key else
                              (("application", guarded_server.app),), timeout=60)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Generate(request, metadata=guarded_server.grpc_metadata(GUARDED_KEY), timeout=60)
        assert len(ok.token_ids) >= 1
