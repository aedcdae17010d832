"""Security defaults, against the live guarded server (API key ``GUARDED_KEY``) and the
code that sets the defaults:

- with an API key, every HTTP route but ``/health`` (the OpenAPI pages and unknown paths
  included) answers 401 to a missing or wrong key, and both gRPC methods answer
  ``UNAUTHENTICATED``;
- the replica's drain methods are reachable by neither gRPC nor HTTP clients;
- the key is in no response (``/metrics``, ``/health``, the OpenAPI spec) and in none of
  the test session's Ray logs after requests that carried it;
- ``raymoe serve`` defaults: HTTP on 127.0.0.1, gRPC off (Ray Serve's gRPC proxy binds
  every interface), embedded Ray without its dashboard;
- the Helm chart takes the key from a Secret, never from values.

What a running ``raymoe serve`` process listens on, and its own logs, are checked in
``test_shutdown.py`` (the suite's one embedded-Ray subprocess)."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest

from raymoe.deploy.grpc_stubs import RaymoeServiceStub
from raymoe.deploy.grpc_stubs import raymoe_pb2 as pb
from tests.e2e.conftest import GUARDED_KEY

ROOT = Path(__file__).resolve().parents[2]
ROUTES = [("GET", "/v1/models"), ("GET", "/v1/models/tiny-chat"), ("POST", "/v1/completions"),
          ("POST", "/v1/chat/completions"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"),
          ("GET", "/no/such/route"), ("POST", "/start_draining")]
BAD_AUTH = {"missing": None, "wrong": f"Bearer {GUARDED_KEY}x", "prefix": f"Bearer {GUARDED_KEY[:-1]}",
            "empty": "Bearer", "other scheme": f"Basic {GUARDED_KEY}", "bare key": GUARDED_KEY}


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_but_health_needs_the_key(guarded_server, method, path):
    body = {"model": guarded_server.model, "prompt": "hi", "max_tokens": 2}
    with httpx.Client(timeout=30) as http:
        for label, auth in BAD_AUTH.items():
            headers = {"Authorization": auth} if auth is not None else {}
            r = http.request(method, f"{guarded_server.base_url}{path}", headers=headers,
                             json=body if method == "POST" else None)
            assert r.status_code == 401, (label, r.status_code, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = http.request(method, f"{guarded_server.base_url}{path}", headers=guarded_server.headers(),
                         json=body if method == "POST" else None)
        assert r.status_code != 401, r.text  # the key opens it (404 for the unknown paths)
        assert http.get(f"{guarded_server.base_url}/health").status_code == 200  # needs no key


def test_both_grpc_methods_need_the_key(guarded_server):
    request = pb.GenerateRequest(prompt="hi", max_tokens=2)
    with grpc.insecure_channel(guarded_server.grpc_target) as channel:
        stub = RaymoeServiceStub(channel)
        for call in (stub.Generate, lambda *a, **k: list(stub.GenerateStream(*a, **k))):
            for label, auth in BAD_AUTH.items():
                metadata = (("application", guarded_server.app),) + ((("authorization", auth),) if auth else ())
                with pytest.raises(grpc.RpcError) as info:
                    call(request, metadata=metadata, timeout=60)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, label
        assert list(stub.GenerateStream(request, metadata=guarded_server.grpc_metadata(), timeout=60))


def test_drain_methods_are_not_reachable_by_clients(guarded_server):
    """Serve's gRPC proxy routes only the .proto's methods; HTTP only the FastAPI routes."""
    with grpc.insecure_channel(guarded_server.grpc_target) as channel:
        for method in ("start_draining", "fail_in_flight", "in_flight"):
            call = channel.unary_unary(f"/raymoe.RaymoeService/{method}")
            with pytest.raises(grpc.RpcError) as info:
                call(b"", metadata=guarded_server.grpc_metadata(), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
    r = httpx.post(f"{guarded_server.base_url}/start_draining", headers=guarded_server.headers(), timeout=30)
    assert r.status_code == 404
    health = httpx.get(f"{guarded_server.base_url}/health", timeout=30)
    assert health.status_code == 200, health.text  # not draining


def test_the_key_is_in_no_response_and_no_ray_log(guarded_server, ray_session):
    from ray._private import worker

    with httpx.Client(timeout=60, headers=guarded_server.headers()) as http:
        done = http.post(f"{guarded_server.openai_base}/completions",
                         json={"model": guarded_server.model, "prompt": "hi", "max_tokens": 2})
        assert done.status_code == 200
        for path in ("/metrics", "/health", "/openapi.json", "/v1/models"):
            assert GUARDED_KEY not in http.get(f"{guarded_server.base_url}{path}").text, path
    logs = Path(worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    leaked = [str(p) for p in files if GUARDED_KEY.encode() in p.read_bytes()]
    print(f"\n[security] API key searched in {len(files)} files of {logs}: found in {leaked}")
    assert len(files) > 10 and not leaked


def _serve_args(*argv: str) -> argparse.Namespace:
    from raymoe.deploy import serve_cli as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_raymoe_serve_defaults_bind_loopback_and_leave_grpc_off():
    from raymoe.deploy.serve_cli import grpc_enabled

    args = _serve_args()
    assert args.host == "127.0.0.1" and not grpc_enabled(args)
    assert grpc_enabled(_serve_args("--grpc-port", "9000"))
    assert not grpc_enabled(_serve_args("--grpc-port", "9000", "--no-grpc"))


def test_raymoe_serve_starts_ray_without_its_dashboard(monkeypatch):
    from raymoe.cluster import bootstrap
    from raymoe.cluster.config import RayConfig

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(bootstrap.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(bootstrap.ray, "init", lambda **kwargs: calls.append(kwargs))
    bootstrap.connect(RayConfig())
    [kwargs] = calls
    assert kwargs.get("include_dashboard") is False
    assert kwargs.get("dashboard_host", "127.0.0.1") == "127.0.0.1"  # Ray's default: loopback


def test_helm_chart_reads_the_key_from_a_secret():
    from raymoe.deploy.k8s import render as k8s

    objects = k8s.render(k8s.load_values(None, [], ["apiKey.existingSecret=raymoe-api-key"]))
    [service] = [o for o in objects if o["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["RAYMOE_API_KEY"] == {"name": "RAYMOE_API_KEY", "valueFrom": {
            "secretKeyRef": {"name": "raymoe-api-key", "key": "api-key"}}}
    assert "api_key_env" in service["spec"]["serveConfigV2"] and "api_key:" not in service["spec"]["serveConfigV2"]
    with pytest.raises(k8s.ValuesError) as err:  # no way to put the key itself in values
        k8s.render(k8s.load_values(None, [], ["apiKey.value=sk-123"]))
    assert err.value.path == "apiKey"
    chart = (ROOT / "deploy" / "helm" / "raymoe" / "templates" / "_helpers.tpl").read_text()
    assert "secretKeyRef" in chart and '"api_key_env" "RAYMOE_API_KEY"' in chart and '"api_key" ' not in chart
