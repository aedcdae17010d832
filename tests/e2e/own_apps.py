"""Serve applications of their own for the fault tests (a tiny deadline, a replica to
kill), deployed next to the shared ones on the same Serve instance under their own name
and route prefix, so the faults they inject never reach the shared servers."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from tests.e2e.conftest import MODEL_NAME, Server


def deploy_own_app(tmp_dir: Path, serve_instance, model_dir: Path, app: str, batching: dict,
                   **args) -> Server:
    """Deploy the raymoe builder as application ``app`` at ``/app`` (1 expert rank);
    ``args``: more builder arguments (``request_timeout_s``, ``api_key``, ...)."""
    from ray import serve

    from raymoe.deploy.server import build_app

    config = {"model": str(model_dir), "expert_ranks": 1, "resources": {"cpus_per_actor": 0.1},
              "batching": batching}
    path = tmp_dir / f"{app}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.time()
    serve.run(build_app({"config": str(path), "model_name": MODEL_NAME, **args}), name=app, route_prefix=f"/{app}")
    print(f"\n[e2e] app {app!r} up in {time.time() - started:.1f}s")
    http_port, grpc_port = serve_instance
    return Server(f"http://127.0.0.1:{http_port}/{app}", f"127.0.0.1:{grpc_port}", app, MODEL_NAME, model_dir,
                  args.get("api_key"))


def delete_app(app: str) -> None:
    from ray import serve

    serve.delete(app)
