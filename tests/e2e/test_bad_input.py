"""Bad input never reaches the model and never kills the server: every case gets its
documented status and OpenAI error object (docs/serving.md), and the server answers a
good request right after. Plus the API key, a full queue (429 + Retry-After) and a
client that disconnects mid-stream (its KV-cache slot is freed)."""

from __future__ import annotations

import asyncio
import time

import httpx2 as httpx
import openai
import pytest

from tests.e2e.conftest import CONTEXT, GUARDED_KEY, metric, metric_samples

GOOD = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

# (route, body or raw bytes, status, error.param, a piece of error.message, error.code)
CASES = [
    ("completions", b'{"model": "tiny-chat", "prompt": ', 400, None, "not valid JSON", None),
    ("completions", b"[1, 2]", 400, None, "must be a JSON object", None),
    ("completions", b"", 400, None, "JSON object body is required", None),
    ("completions", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens", "'ten'", None),
    ("completions", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", "2.5", None),
    ("completions", {**GOOD, "temperature": "hot"}, 400, "temperature", "valid number", None),
    ("completions", {**GOOD, "stream": "yes"}, 400, "stream", "valid boolean", None),
    ("completions", {**GOOD, "prompt": 5}, 400, "prompt", "5", None),
    ("completions", {**GOOD, "prompt": [1, "a"]}, 400, "prompt", "", None),
    ("completions", {k: v for k, v in GOOD.items() if k != "model"}, 400, "model", "required", None),
    ("completions", {**GOOD, "max_tokens": CONTEXT}, 400, "max_tokens", "context window", "context_length_exceeded"),
    ("completions", {**GOOD, "max_tokens": 10**9}, 400, "max_tokens", "context window", "context_length_exceeded"),
    ("completions", {**GOOD, "prompt": "x" * CONTEXT}, 400, "prompt", "context window", "context_length_exceeded"),
    ("completions", {**GOOD, "prompt": ""}, 400, "prompt", "empty", None),
    ("completions", {**GOOD, "prompt": []}, 400, "prompt", "empty", None),
    ("completions", {**GOOD, "prompt": [[]]}, 400, "prompt", "empty", None),
    ("completions", {**GOOD, "prompt": [3, 96]}, 400, "prompt", "96", None),
    ("completions", {**GOOD, "model": "gpt-4o"}, 404, "model", "gpt-4o", "model_not_found"),
    ("completions", {**GOOD, "temperature": 2.5}, 400, "temperature", "2.5", None),
    ("completions", {**GOOD, "top_p": 0}, 400, "top_p", "greater than 0", None),
    ("completions", {**GOOD, "n": 0}, 400, "n", "0", None),
    ("completions", {**GOOD, "seed": -1}, 400, "seed", "-1", None),
    ("completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "", None),
    ("completions", {**GOOD, "stop": ""}, 400, "stop", "", None),
    ("completions", {**GOOD, "stop_token_ids": [500]}, 400, "stop_token_ids", "500", None),
    ("completions", {**GOOD, "logprobs": 21}, 400, "logprobs", "less than or equal to 20", None),
    ("completions", {**GOOD, "best_of": 2}, 400, "best_of", "not supported", None),
    ("completions", {**GOOD, "presence_penalty": 2.5}, 400, "presence_penalty", "2.5", None),
    ("completions", {**GOOD, "logit_bias": {"abc": 1}}, 400, "logit_bias", "'abc'", None),
    ("completions", {**GOOD, "logit_bias": {"96": 1}}, 400, "logit_bias", "'96'", None),
    ("completions", {**GOOD, "logit_bias": {"5": 500}}, 400, "logit_bias", "500", None),
    ("completions", {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty", "0", None),
    ("completions", {**GOOD, "min_tokens": 9}, 400, "min_tokens", "max_new_tokens=3", None),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "needs 'logprobs': true", None),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs", "-1", None),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages", "", None),
    ("chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "'hi'", None),
    ("chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role",
     "'wizard'", None),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "extra": 1}]}, 400,
     "messages.0.extra", "Unrecognized", None),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * CONTEXT}]}, 400, "messages",
     "context window", "context_length_exceeded"),
    ("chat/completions", {**CHAT, "max_completion_tokens": CONTEXT}, 400, "max_tokens", "context window",
     "context_length_exceeded"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools.0.function", "", None),
    ("chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice", "", None),
    ("completions", {**GOOD, "suffix": "x"}, 400, "suffix", "not supported", None),
    ("chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format",
     "needs its 'json_schema'", None),
    ("completions", {**GOOD, "guided_regex": "(a"}, 400, "guided_regex", "cannot be compiled", None),
    ("chat/completions", {**CHAT, "model": "nope"}, 404, "model", "nope", "model_not_found"),
]


def _post(server, route: str, body, headers=None) -> httpx.Response:
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    if headers:
        kwargs["headers"] = {**kwargs.get("headers", {}), **headers}
    return httpx.post(f"{server.openai_base}/{route}", timeout=60, **kwargs)


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("route,body,status,param,message,code", CASES,
                         ids=[f"{i}-{c[0]}-{c[3]}" for i, c in enumerate(CASES)])
def test_bad_request_gets_its_status_and_error_object(server, route, body, status, param, message, code):
    response = _post(server, route, body)
    assert response.status_code == status, response.text
    error = _error(response)
    assert error["param"] == param and message in error["message"] and error["code"] == code, error
    assert error["type"] == ("invalid_request_error")


EXTRA = {"frobnicate": 1, "store": False, "metadata": {"app": "x"}, "parallel_tool_calls": False,
         "repetition_penalty": 1.0}


def test_unknown_fields_are_ignored_or_refused_in_strict_mode(server, guarded_server):
    """Lenient by default, as vLLM: fields raymoe does not know are ignored (a warning in
    the replica's log) and the answer is the one without them. The guarded server runs
    with ``strict_fields``: a 400 naming the first. Fields inside a message stay strict
    (CASES)."""
    for route, body in (("completions", GOOD), ("chat/completions", {**CHAT, "temperature": 0})):
        plain = _post(server, route, body)
        extra = _post(server, route, {**body, **EXTRA})
        assert plain.status_code == extra.status_code == 200, extra.text
        assert extra.json()["choices"] == plain.json()["choices"]
        strict = _post(guarded_server, route, {**body, **EXTRA}, headers=guarded_server.headers())
        assert strict.status_code == 400 and _error(strict)["param"] == "frobnicate", strict.text
        assert "Unrecognized request argument" in _error(strict)["message"]
    client = openai.OpenAI(base_url=server.openai_base, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny-chat", messages=CHAT["messages"], max_tokens=3, temperature=0,
                                           store=False, metadata={"app": "x"}, parallel_tool_calls=False)
    assert reply.choices[0].message.content == \
        _post(server, "chat/completions", {**CHAT, "temperature": 0}).json()["choices"][0]["message"]["content"]


def test_unknown_routes_and_methods_get_error_objects(server):
    missing = httpx.get(f"{server.base_url}/v1/engines", timeout=30)
    assert missing.status_code == 404 and _error(missing)["type"] == "not_found_error"
    wrong_method = httpx.get(f"{server.openai_base}/completions", timeout=30)
    assert wrong_method.status_code == 405 and _error(wrong_method)
    unknown_model = httpx.get(f"{server.openai_base}/models/gpt-4o", timeout=30)
    assert unknown_model.status_code == 404 and _error(unknown_model)["code"] == "model_not_found"


def test_a_huge_unknown_model_name_gets_a_short_404(server):
    name = "m" * (1 << 20)
    response = _post(server, "completions", {"model": name, "prompt": "hi", "max_tokens": 1})
    assert response.status_code == 404 and len(response.content) < 2048
    error = _error(response)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "m" * 150 in error["message"]


def test_openai_client_raises_typed_errors_and_the_server_keeps_serving(server):
    with openai.OpenAI(base_url=server.openai_base, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=server.model, prompt="hi", max_tokens=10**6)
        assert info.value.status_code == 400 and info.value.body["param"] == "max_tokens"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        after = client.completions.create(model=server.model, prompt="still there?", max_tokens=4, temperature=0)
    assert after.usage.completion_tokens >= 1
    assert httpx.get(f"{server.base_url}/health", timeout=30).json()["status"] == "ok"


def test_api_key_guards_every_route_but_health(guarded_server):
    s = guarded_server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {GUARDED_KEY}"}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
            r = httpx.request(method, f"{s.base_url}{path}", json=GOOD, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
            assert _error(r)["type"] == "authentication_error"
    assert httpx.get(f"{s.base_url}/health", timeout=30).status_code == 200
    ok = httpx.post(f"{s.openai_base}/completions", json=GOOD, headers=s.headers(), timeout=60)
    assert ok.status_code == 200, ok.text
    with openai.OpenAI(base_url=s.openai_base, api_key=GUARDED_KEY, max_retries=0) as client:
        assert client.models.list().data[0].id == s.model
    with openai.OpenAI(base_url=s.openai_base, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


async def _burst(server, count: int) -> list[httpx.Response]:
    body = {**GOOD, "max_tokens": 40, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120, headers=server.headers()) as client:
        return await asyncio.gather(*(client.post(f"{server.openai_base}/completions", json=body)
                                      for _ in range(count)))


def test_full_queue_gets_429_with_retry_after(guarded_server):
    """2 KV slots and a queue of 2: of 10 simultaneous requests some must be refused."""
    responses = asyncio.run(_burst(guarded_server, 10))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1  # whole seconds until a slot is expected to free
            error = _error(r)
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
    ok = httpx.post(f"{guarded_server.openai_base}/completions", json=GOOD, headers=guarded_server.headers(),
                    timeout=60)
    assert ok.status_code == 200  # the queue drained, the server serves again


def _scrape(server) -> dict:
    return metric_samples(httpx.get(f"{server.base_url}/metrics", headers=server.headers(), timeout=30).text)


def test_client_disconnecting_mid_stream_frees_its_slot(guarded_server):
    s = guarded_server
    before = metric(_scrape(s), "raymoe_request_finished_total", reason="abort")
    body = {**GOOD, "max_tokens": CONTEXT - 8, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers=s.headers()) as client:
        for _ in range(2):  # both KV slots
            with client.stream("POST", f"{s.openai_base}/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                assert next(l for l in lines if l).startswith("data: ")  # noqa: E741
            # leaving the block closes the connection mid-stream
    deadline = time.time() + 20
    while time.time() < deadline:
        samples = _scrape(s)
        aborted = metric(samples, "raymoe_request_finished_total", reason="abort") - before
        if aborted == 2 and metric(samples, "raymoe_running_sequences") == 0:
            break
        time.sleep(0.2)
    assert aborted == 2 and metric(samples, "raymoe_running_sequences") == 0
    started = time.time()
    ok = httpx.post(f"{s.openai_base}/completions", json=GOOD, headers=s.headers(), timeout=60)
    assert ok.status_code == 200 and time.time() - started < 10  # a slot was free at once
