"""Request deadlines (``request_timeout_s``): a request still running when its deadline
passes is aborted, its KV-cache slot freed, and its client gets a clear error, never a
hang: HTTP 504 with an OpenAI error object (``code: deadline_exceeded``), an error event
in a stream, gRPC ``DEADLINE_EXCEEDED``.

The application of this module has a 1-second deadline and a single KV slot, so a long
generation runs past the deadline, and a short request that follows can run only if the
slot was given back. "Long" is 4,000 tokens of a model with a 4,096-token context: about
16 s here (the stream gets about 250 characters in its 1 s), so the deadline passes on any
machine within 16x of this one (240 tokens, the old length, once finished in
0.87 s: inside the deadline)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx2 as httpx
import openai
import pytest

from raymoe.deploy.grpc_stubs import RaymoeServiceStub
from raymoe.deploy.grpc_stubs import raymoe_pb2 as pb
from tests.e2e.conftest import metric, metric_samples
from tests.e2e.own_apps import delete_app, deploy_own_app
from tests.tiny_models import save_char_tokenizer, save_tiny_model

DEADLINE_S = 1.0
LONG_TOKENS = 4000
LONG = {"prompt": "def f(x):", "max_tokens": LONG_TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
BOUND_S = DEADLINE_S + 10  # the error comes within this of the request's start (2-core machine, shared)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """The tiny chat model's shape with a 4,096-token context."""
    path = tmp_path_factory.mktemp("tiny-long")
    save_tiny_model("mixtral", path, seed=11, max_position_embeddings=4096)
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def deadline_server(tmp_path_factory, serve_instance, long_model):
    server = deploy_own_app(tmp_path_factory.mktemp("deadline"), serve_instance, long_model, "deadline",
                            {"max_seqs": 1, "max_queue": 8, "max_seq_len": 4096}, request_timeout_s=DEADLINE_S)
    yield server
    delete_app("deadline")


@pytest.fixture(scope="module")
def client(deadline_server):
    with openai.OpenAI(base_url=deadline_server.openai_base, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _short_request_succeeds(client, model: str) -> float:
    """A 2-token request on the single KV slot: it runs only if the slot was freed."""
    started = time.perf_counter()
    out = client.completions.create(model=model, prompt="hi", max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")
    return time.perf_counter() - started


def test_request_past_its_deadline_gets_504_and_frees_its_slot(deadline_server, client):
    started = time.perf_counter()
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=deadline_server.model, **LONG)
    elapsed = time.perf_counter() - started
    print(f"\n[deadline] non-streamed: 504 after {elapsed:.2f}s (deadline {DEADLINE_S}s)")
    assert info.value.status_code == 504
    error = info.value.body
    assert error["code"] == "deadline_exceeded" and "request_timeout_s" in error["message"], error
    assert DEADLINE_S <= elapsed < BOUND_S
    assert _short_request_succeeds(client, deadline_server.model) < DEADLINE_S

    samples = metric_samples(httpx.get(f"{deadline_server.base_url}/metrics", timeout=30).text)
    assert metric(samples, "raymoe_requests_total", route="/v1/completions", status=504) >= 1
    assert metric(samples, "raymoe_request_finished_total", reason="abort") >= 1
    assert metric(samples, "raymoe_running_sequences") == 0


def test_queued_requests_count_their_wait_against_the_deadline(deadline_server):
    """Three long requests on one slot: the first runs, two wait; all get 504 in time."""
    body = {"model": deadline_server.model, "prompt": LONG["prompt"], "max_tokens": LONG_TOKENS, "temperature": 0,
            "ignore_eos": True}

    def one(http: httpx.Client) -> tuple[int, float]:
        started = time.perf_counter()
        r = http.post(f"{deadline_server.openai_base}/completions", json=body)
        return r.status_code, time.perf_counter() - started

    from concurrent.futures import ThreadPoolExecutor

    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: one(http), range(3)))
    print(f"\n[deadline] 3 on one slot: {[(s, round(t, 2)) for s, t in results]}")
    assert all(status == 504 and elapsed < BOUND_S for status, elapsed in results), results


def test_stream_past_its_deadline_ends_with_an_error_event(deadline_server, client):
    started, text = time.perf_counter(), []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.completions.create(model=deadline_server.model, stream=True, **LONG):
            text.append(chunk.choices[0].text if chunk.choices else "")
    elapsed = time.perf_counter() - started
    print(f"\n[deadline] streamed: error after {elapsed:.2f}s and {len(''.join(text))} characters")
    assert "deadline" in str(info.value) and "request_timeout_s" in str(info.value)
    assert DEADLINE_S <= elapsed < BOUND_S
    assert _short_request_succeeds(client, deadline_server.model) < DEADLINE_S


def test_grpc_request_past_its_deadline_gets_deadline_exceeded(deadline_server):
    request = pb.GenerateRequest(model=deadline_server.model, prompt=LONG["prompt"], max_tokens=LONG_TOKENS,
                                 ignore_eos=True)
    with grpc.insecure_channel(deadline_server.grpc_target) as channel:
        stub = RaymoeServiceStub(channel)
        for name, call in (("Generate", stub.Generate), ("GenerateStream", lambda *a, **k: list(stub.GenerateStream(
                *a, **k)))):
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                call(request, metadata=deadline_server.grpc_metadata(), timeout=60)  # the client's own: longer
            elapsed = time.perf_counter() - started
            print(f"\n[deadline] gRPC {name}: {info.value.code().name} after {elapsed:.2f}s")
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
            assert "request_timeout_s" in info.value.details()
            assert DEADLINE_S <= elapsed < BOUND_S
        ok = stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), metadata=deadline_server.grpc_metadata(),
                           timeout=60)
        assert len(ok.token_ids) >= 1


def test_request_timeout_is_a_checked_setting(tmp_path):
    """``request_timeout_s`` / ``--request-timeout-s``: positive, named in the error."""
    import argparse

    from raymoe.deploy import serve_cli as cli
    from raymoe.deploy.settings import ServeArgsError, settings_from_args

    base = {"config": "deploy/configs/tiny.yaml"}
    assert settings_from_args(base).request_timeout_s == 300.0
    assert settings_from_args({**base, "request_timeout_s": 2.5}).request_timeout_s == 2.5
    with pytest.raises(ServeArgsError, match="request_timeout_s.*greater than 0"):
        settings_from_args({**base, "request_timeout_s": 0})
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--request-timeout-s", "7", "--drain-timeout-s", "3"])
    assert (args.request_timeout_s, args.drain_timeout_s) == (7.0, 3.0)


def test_a_stuck_engine_step_holds_no_request_past_its_deadline(chat_model):
    """No Serve: the service over an engine loop whose step hangs (a stuck collective). A
    request in flight and a new one (never taken from the inbox) both get their 504."""
    from raymoe.deploy.engine_loop import EngineLoop
    from raymoe.deploy.errors import APIError
    from raymoe.deploy.metrics import ServingMetrics
    from raymoe.deploy.service import ModelService
    from raymoe.workers.reference import ReferenceEngine
    from raymoe.workers.sampling import SamplingParams

    engine = ReferenceEngine.from_pretrained(chat_model, max_seqs=2, max_seq_len=64)
    flowing, stuck = threading.Event(), threading.Event()
    flowing.set()
    step = engine.step

    def gated_step():
        if not flowing.is_set():
            stuck.set()
            flowing.wait()
        return step()

    engine.step = gated_step
    loop = EngineLoop(engine, idle_wait_s=0.05).start()
    service = ModelService("m", loop, SimpleNamespace(tokenizer=None), ServingMetrics("m"), request_timeout_s=0.5)

    async def main() -> tuple[APIError, float, APIError, float]:
        [running] = await service.start([[5, 6]], [SamplingParams(max_new_tokens=50, ignore_eos=True)])
        flowing.clear()
        await asyncio.to_thread(stuck.wait, 10)
        started = time.perf_counter()
        with pytest.raises(APIError) as new:
            await service.start([[7]], [SamplingParams(max_new_tokens=2)])
        new_s = time.perf_counter() - started
        with pytest.raises(APIError) as old:
            await service.collect([running], [()])
        return new.value, new_s, old.value, time.perf_counter() - running.arrived

    try:
        new, new_s, old, old_s = asyncio.run(main())
    finally:
        flowing.set()
        loop.stop()
    print(f"\n[deadline] stuck step: new request {new.status} after {new_s:.2f}s, running one {old.status} "
          f"{old_s:.2f}s after its arrival")
    assert (new.status, new.code, old.status, old.code) == (504, "deadline_exceeded", 504, "deadline_exceeded")
    assert 0.5 <= new_s < 3 and 0.5 <= old_s < 3
