"""Graceful shutdown. ``raymoe serve`` (a real subprocess with its own embedded Ray) on
SIGTERM refuses new requests (503 ``server_shutting_down``, or connection refused once
the proxy is gone), lets the requests in flight finish with their full text, and exits 0.

The same process is checked for what it exposes by default (the one embedded Ray of the
suite is costly, ~20-40 s): HTTP on 127.0.0.1 only, no gRPC port, no Ray dashboard on a
reachable address, and its API key in none of its output or Ray logs.

The drain itself, including the drain deadline (requests still running are failed with a
503), is also driven in the test session's Serve through the replica's methods."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import openai
import psutil
import pytest
import yaml

from tests.e2e.conftest import FAULT_APP, free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-shutdown-test-5b9e1c0d7a"
MODEL = "shut-model"
PROMPTS = ["def f(x):", "class A:", "import os", "for i in"]
MAX_TOKENS = 240  # ~4 s for the four together on the 2-core machine
START_BOUND_S = 180
EXIT_BOUND_S = 90  # from SIGTERM to exit: the drain (a few seconds) + deleting the app + stopping Ray


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    ray_tmp: Path
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


def _pump(stream, into: list[str], first_line: threading.Event | None = None) -> None:
    for line in stream:
        into.append(line)
        if first_line is not None:
            first_line.set()


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory, chat_model):
    config = tmp_path_factory.mktemp("shutdown") / "deployment.yaml"
    config.write_text(yaml.safe_dump({"model": str(chat_model), "expert_ranks": 1,
                                      "resources": {"cpus_per_actor": 0.1},
                                      "batching": {"max_seqs": 8, "max_seq_len": 256}}))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rmsd", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the test session's
    env.update(RAYMOE_API_KEY=KEY, RAY_TMPDIR=str(ray_tmp))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "raymoe.deploy.serve_cli", "--config", str(config), "--port", str(port),
                             "--model-name", MODEL, "--drain-timeout-s", "60"],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sp, ready = ServeProcess(proc, port, ray_tmp), threading.Event()
    threading.Thread(target=_pump, args=(proc.stdout, sp.stdout, ready), daemon=True).start()
    threading.Thread(target=_pump, args=(proc.stderr, sp.stderr), daemon=True).start()
    try:
        if not ready.wait(START_BOUND_S):
            pytest.fail(f"no URL line within {START_BOUND_S}s; stderr:\n{''.join(sp.stderr)[-3000:]}")
        assert f"{sp.base}/v1" in sp.stdout[0] and "gRPC off" in sp.stdout[0], sp.stdout[0]
        yield sp
    finally:
        sp.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def long_reference(chat_model):
    from raymoe.workers.reference import ReferenceEngine
    from raymoe.workers.sampling import SamplingParams

    engine = ReferenceEngine.from_pretrained(chat_model, max_seqs=1, max_seq_len=256)
    params = SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True)
    return {p: engine.generate_ids([engine.tokenizer.encode(p)], params)[0].text for p in PROMPTS}


def _listeners(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(command line, address, port) of every listening TCP socket of these processes."""
    found = []
    for p in processes:
        try:
            cmdline = " ".join(p.cmdline())
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((cmdline, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.slow
def test_raymoe_serve_exposes_http_on_loopback_only_and_no_grpc_or_dashboard(serve_process):
    listeners = _listeners(serve_process.tree())
    http = [(ip, port) for _, ip, port in listeners if port == serve_process.port]
    dashboards = [(ip, port) for cmdline, ip, port in listeners if "dashboard/dashboard.py" in cmdline]
    others = sorted({(cmdline.split()[0].rsplit("/", 1)[-1], ip, port) for cmdline, ip, port in listeners
                     if ip not in ("127.0.0.1", "::1")})
    print(f"\n[security] HTTP {http}; Ray dashboard head {dashboards}; other listeners off loopback "
          f"(Ray's own gRPC services and agents, behind its token auth): {others}")
    assert http and all(ip == "127.0.0.1" for ip, _ in http), http
    assert not [entry for entry in listeners if entry[2] == 9000], "a gRPC port is open by default"
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in dashboards), f"the Ray dashboard is reachable: {dashboards}"
    assert httpx.get(f"{serve_process.base}/v1/models", timeout=30).status_code == 401  # the key is on
    assert httpx.get(f"{serve_process.base}/health", timeout=30).status_code != 401  # /health needs none


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_then_exits_0(serve_process, long_reference):
    client = openai.OpenAI(base_url=f"{serve_process.base}/v1", api_key=KEY, max_retries=0, timeout=120)
    first_chunk = {p: threading.Event() for p in PROMPTS}
    finished_at: dict[str, float] = {}

    def stream(prompt: str) -> tuple[str, str]:
        text, reason = [], None
        for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):
            first_chunk[prompt].set()
            text.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        finished_at[prompt] = time.monotonic()
        return "".join(text), reason

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = {p: pool.submit(stream, p) for p in PROMPTS}
        assert all(first_chunk[p].wait(60) for p in PROMPTS), "the streams did not start"
        serve_process.proc.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        while not any("new requests are refused" in line for line in serve_process.stderr):
            assert time.monotonic() - sigterm < 30, "raymoe serve did not start draining"
            time.sleep(0.05)
        admission_closed_s = time.monotonic() - sigterm
        assert not all(f.done() for f in futures.values())

        refusals = []  # new requests while draining: 503 server_shutting_down, or refused once the proxy is gone
        while not all(f.done() for f in futures.values()):
            try:
                r = httpx.post(f"{serve_process.base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                               json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
                refusals.append((r.status_code, r.json().get("error", {}).get("code")))
            except httpx.ConnectError:
                refusals.append(("connection refused", None))
            time.sleep(0.3)
        results = {p: f.result(timeout=120) for p, f in futures.items()}
    drain_s = max(finished_at.values()) - sigterm
    code = serve_process.proc.wait(timeout=EXIT_BOUND_S)
    exit_s = time.monotonic() - sigterm
    print(f"\n[shutdown] in flight at SIGTERM: {len(PROMPTS)}; new requests refused {admission_closed_s:.2f}s after "
          f"it; last finished {drain_s:.2f}s after it; exit {code} "
          f"{exit_s:.1f}s after it; new requests meanwhile: {sorted(set(refusals), key=str)}")
    print("[shutdown] " + " | ".join(line.strip() for line in serve_process.stderr if "raymoe serve:" in line))
    for prompt in PROMPTS:
        assert results[prompt] == (long_reference[prompt], "length"), prompt
    assert refusals and all(r in ((503, "server_shutting_down"), ("connection refused", None)) for r in refusals), \
        refusals
    assert code == 0 and exit_s < EXIT_BOUND_S
    assert any("drained in" in line for line in serve_process.stderr)


@pytest.mark.slow
def test_api_key_is_in_none_of_its_output_or_ray_logs(serve_process):
    """After requests that carried the key (the previous tests) and the shutdown."""
    serve_process.stop()
    time.sleep(1)  # the pump threads read the last lines
    output = "".join(serve_process.stdout + serve_process.stderr)
    assert output and KEY not in output
    logs = list(serve_process.ray_tmp.rglob("logs/*"))
    assert len(logs) > 10, logs  # the Ray session's logs are where we look
    leaked = [str(p) for p in logs if p.is_file() and KEY.encode() in p.read_bytes()]
    print(f"\n[security] API key searched in {len(logs)} Ray log files and the process output: found in {leaked}")
    assert not leaked


# -- the drain, in the test session's Serve ------------------------------------------------

def test_draining_refuses_new_requests_and_the_drain_deadline_fails_the_rest(fault_server):
    """The fault tests' application, as its last user (it refuses requests afterwards)."""
    from ray import serve

    drain_server = fault_server
    handle = serve.get_app_handle(FAULT_APP)
    client = openai.OpenAI(base_url=drain_server.openai_base, api_key="unused", max_retries=0, timeout=60)
    started, errors = threading.Event(), []

    def stream() -> str:
        try:
            for _ in client.completions.create(model=drain_server.model, prompt="x", max_tokens=240,
                                               stream=True, extra_body={"ignore_eos": True}):
                started.set()
        except openai.APIError as exc:
            errors.append(str(exc))
            return "error"
        return "complete"

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stream) for _ in range(2)]
        assert started.wait(60)
        time.sleep(0.3)
        assert handle.start_draining.remote().result(timeout_s=30) == 2
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=drain_server.model, prompt="hi", max_tokens=2)
        assert info.value.status_code == 503 and info.value.body["code"] == "server_shutting_down"
        health = httpx.get(f"{drain_server.base_url}/health", timeout=30)
        assert health.status_code == 503 and "draining" in health.json()["reason"]
        assert handle.fail_in_flight.remote("drain deadline (test)").result(timeout_s=30) == 2
        outcomes = [f.result(timeout=30) for f in futures]
    assert outcomes == ["error", "error"] and all("drain deadline (test)" in e for e in errors), errors
    assert handle.in_flight.remote().result(timeout_s=30) == 0
