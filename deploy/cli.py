"""``raymoe serve``: start the Serve application on the embedded Ray (or the config's
cluster), print its URLs, serve until Ctrl-C / SIGTERM, then shut everything down.

    python -m deploy.cli --config deploy/configs/tiny.yaml [--port 8000] [--grpc-port 9000]

``add_arguments(parser)`` and ``run(args)`` are what ``cluster/cli.py`` wires up as the
``serve`` subcommand. The URL goes to stdout, logs to stderr. On a cluster it joined
(``ray.address`` or ``RAY_ADDRESS``) it removes only its own application when it stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "deploy" / "configs" / "tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"raymoe deployment YAML (default: {DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (default 9000)")
    parser.add_argument("--no-grpc", action="store_true", help="serve HTTP only")
    parser.add_argument("--model-name", help="the name clients send as 'model' (default: the model directory's)")
    parser.add_argument("--api-key-env", default="RAYMOE_API_KEY",
                        help="environment variable holding the API key; unset or empty: no key "
                             "(default RAYMOE_API_KEY)")
    parser.add_argument("--app-name", default="raymoe", help="Serve application name (gRPC 'application' metadata)")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _start(args: argparse.Namespace, settings) -> None:
    from ray import serve

    from cluster.bootstrap import connect
    from deploy.server import GRPC_SERVICER, app_for

    connect(settings.config.ray)
    grpc_options = None if args.no_grpc else {"port": args.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
    serve.start(http_options={"host": args.host, "port": args.port}, grpc_options=grpc_options)
    serve.run(app_for(settings), name=args.app_name, route_prefix="/", blocking=False)


def run(args: argparse.Namespace) -> int:
    from cluster.config import DeploymentConfigError
    from deploy.settings import ServeArgsError, settings_from_args
    from workers.model.errors import RaymoeModelError

    app_args = {"config": str(args.config), "api_key_env": args.api_key_env}
    if args.model_name:
        app_args["model_name"] = args.model_name
    try:
        settings = settings_from_args(app_args)
        from workers.model.checkpoint import Checkpoint  # torch: only once the arguments are good

        Checkpoint(settings.config.model, settings.config.moge_groups)  # a bad checkpoint fails here, before Ray
    except (DeploymentConfigError, ServeArgsError, RaymoeModelError) as exc:
        _log(f"raymoe serve: error: {exc}")
        return 2
    import ray
    from ray import serve

    joined = bool(settings.config.ray.address or os.environ.get("RAY_ADDRESS"))  # a cluster we must leave as is
    try:
        _start(args, settings)
        base = f"http://{args.host}:{args.port}"
        grpc = "off" if args.no_grpc else f"port {args.grpc_port} (all interfaces: Ray Serve's gRPC proxy)"
        print(f"raymoe: serving '{settings.model_name}' at {base}/v1 (OpenAI API; {base}/health, {base}/metrics), "
              f"gRPC {grpc}{'; API key required' if settings.api_key else ''}", flush=True)
        _wait_for_signal()
        _log("raymoe serve: stopping")
        return 0
    except (RaymoeModelError, RuntimeError) as exc:
        _log(f"raymoe serve: error: {exc}")
        return 1
    finally:
        if ray.is_initialized():
            if joined:
                serve.delete(args.app_name)  # only our application; Serve and the cluster stay up
            else:
                serve.shutdown()
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raymoe serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
