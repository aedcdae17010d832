"""Serve replica death: SIGKILL the replica process (it owns the engine loop and the raymoe
deployment's actors) while requests are in flight. Every client gets an answer, an error
at worst, within a bound (none hangs); Serve starts a new replica, which builds a fresh
deployment, and new requests succeed again. The time from the kill to the first success
is printed (``[replica-death]``).

On the fault tests' application (``fault_server``, after test_actor_death), so the main
servers are not disturbed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import httpx2 as httpx
import pytest

from raymoe.deploy.grpc_stubs import RaymoeServiceStub
from raymoe.deploy.grpc_stubs import raymoe_pb2 as pb
from tests.e2e.conftest import FAULT_APP as APP

ANSWER_BOUND_S = 30  # every in-flight client has its answer this long after the kill
RECOVERY_BOUND_S = 240  # a new replica serves within this (a fresh deployment on 2 busy cores)
LONG = {"prompt": "def f(x):", "max_tokens": 240, "temperature": 0, "ignore_eos": True}


@dataclass
class Outcome:
    kind: str  # "http-stream", "http", "grpc-stream"
    status: str = "pending"  # what the client saw: an HTTP status, "complete", an exception name, a gRPC code
    detail: str = ""
    tokens_before_kill: int = 0
    answered_at: float | None = None  # time.monotonic()


def replica_pid(app: str) -> tuple[str, int]:
    """(actor name, PID) of the application's live Serve replica, from the GCS actor table
    (ray.util.state needs the dashboard, which the test session does not start)."""
    from ray._private.state import actors

    alive = [a for a in actors().values()
             if a["Name"].startswith(f"SERVE_REPLICA::{app}#") and a["State"] == "ALIVE"]
    assert len(alive) == 1, [a["Name"] for a in alive]
    return alive[0]["Name"], alive[0]["Pid"]


def _http_stream(url: str, out: Outcome, started: threading.Event) -> None:
    body = {**LONG, "model": "tiny-chat", "stream": True}
    try:
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=httpx.Timeout(120, read=120)) as r:
            out.status = str(r.status_code)
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        out.detail = event["error"]["message"]
                        out.status = "error-event"
                    elif not started.is_set():
                        started.set()
                    out.tokens_before_kill += 1
                elif line == "data: [DONE]":
                    out.status = out.status if out.status == "error-event" else "complete"
            if out.status == str(r.status_code):
                out.status = "ended-without-[DONE]"
    except Exception as exc:  # the connection cut: an answer too
        out.status, out.detail = type(exc).__name__, str(exc)[:200]
    out.answered_at = time.monotonic()


def _http_unary(url: str, out: Outcome) -> None:
    try:
        r = httpx.post(f"{url}/completions", json={**LONG, "model": "tiny-chat"}, timeout=120)
        out.status, out.detail = str(r.status_code), r.text[:200]
    except Exception as exc:
        out.status, out.detail = type(exc).__name__, str(exc)[:200]
    out.answered_at = time.monotonic()


def _grpc_stream(target: str, out: Outcome, started: threading.Event) -> None:
    request = pb.GenerateRequest(prompt=LONG["prompt"], max_tokens=240, ignore_eos=True)
    try:
        with grpc.insecure_channel(target) as channel:
            for _ in RaymoeServiceStub(channel).GenerateStream(request, metadata=(("application", APP),),
                                                               timeout=120):
                started.set()
        out.status = "complete"
    except grpc.RpcError as exc:
        out.status, out.detail = exc.code().name, (exc.details() or "")[:200]
    out.answered_at = time.monotonic()


@pytest.mark.slow
def test_replica_sigkill_answers_every_client_and_serve_recovers(fault_server):
    url = fault_server.openai_base
    name, pid = replica_pid(APP)
    outcomes, threads, streaming = [], [], []
    for kind in ("http-stream", "http-stream", "grpc-stream", "http", "http"):
        out, started = Outcome(kind), threading.Event()
        target, args = {"http-stream": (_http_stream, (url, out, started)),
                        "grpc-stream": (_grpc_stream, (fault_server.grpc_target, out, started)),
                        "http": (_http_unary, (url, out))}[kind]
        threads.append(threading.Thread(target=target, args=args, daemon=True))
        outcomes.append(out)
        if kind != "http":
            streaming.append(started)
        threads[-1].start()
    for started in streaming:  # every stream has its first tokens: the requests are in the batch
        assert started.wait(60), "a stream did not start"
    time.sleep(0.3)

    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    for thread in threads:
        thread.join(timeout=max(0.0, killed + ANSWER_BOUND_S - time.monotonic()))
    report = [(o.kind, o.status, round(o.answered_at - killed, 2) if o.answered_at else None, o.detail[:80])
              for o in outcomes]
    print(f"\n[replica-death] killed {name} (pid {pid}); clients: {report}")
    assert all(o.answered_at is not None for o in outcomes), f"a client hangs: {report}"
    assert all(o.status != "complete" for o in outcomes if o.kind != "http"), report  # the stream was cut

    recovered, attempts, seen = None, 0, {}
    while time.monotonic() - killed < RECOVERY_BOUND_S:
        attempts += 1
        try:
            r = httpx.post(f"{url}/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 3,
                                                       "temperature": 0}, timeout=15)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if r.status_code == 200:
                recovered = time.monotonic() - killed
                break
        except httpx.HTTPError as exc:
            seen[type(exc).__name__] = seen.get(type(exc).__name__, 0) + 1
        time.sleep(0.5)
    print(f"[replica-death] new requests succeed {recovered and round(recovered, 1)}s after the kill "
          f"({attempts} attempts; answers while down: {seen})")
    assert recovered is not None, f"no success within {RECOVERY_BOUND_S}s: {seen}"
    _, new_pid = replica_pid(APP)
    assert new_pid != pid
    health = httpx.get(f"{fault_server.base_url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["alive"] == health.json()["actors"], health.text
