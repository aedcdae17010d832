"""``raymoe serve``: start the Serve application on the embedded Ray (or the config's
cluster), print its URLs, serve until Ctrl-C / SIGTERM, drain, then shut everything down.

    python -m raymoe.deploy.serve_cli --config deploy/configs/tiny.yaml [--port 8000] [--grpc-port 9000]

``add_arguments(parser)`` and ``run(args)`` are what ``cluster/cli.py`` wires up as the
``serve`` subcommand. The URL goes to stdout, logs to stderr. On a cluster it joined
(``ray.address`` or ``RAY_ADDRESS``) it removes only its own application when it stops.

Exposure: HTTP binds 127.0.0.1 unless ``--host`` says otherwise; gRPC is off unless
``--grpc-port`` is given, because Ray Serve's gRPC proxy (2.60) always listens on every
interface. The embedded Ray starts without its dashboard.

Stopping (SIGTERM or Ctrl-C): new requests get a 503 (``server_shutting_down``); the ones
in flight run to their end for up to ``--drain-timeout-s`` seconds, after which they are
failed with a 503; then the application is deleted and Ray stopped, exit status 0. A
second signal skips what is left of the drain.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "deploy" / "configs" / "tiny.yaml"
PROXY_TIMEOUT_MARGIN_S = 30.0  # Serve's proxies give up this long after the replica's own deadline
DRAIN_POLL_S = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from raymoe.deploy.cli import version

    parser.add_argument("--version", action="version", version=version())
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"raymoe deployment YAML (default: {DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="serve gRPC on this port, on ALL interfaces (Ray Serve's gRPC proxy cannot bind one "
                             "address); default: no gRPC")
    parser.add_argument("--no-grpc", action="store_true", help="serve HTTP only (the default without --grpc-port)")
    parser.add_argument("--model", help="model directory (overrides the config's model; the rest of the config "
                                        "stays, so `raymoe serve --model DIR` needs no YAML of its own)")
    parser.add_argument("--expert-ranks", type=int, help="override the config's expert_ranks")
    parser.add_argument("--layout", choices=["disaggregated", "coherent"], help="override the config's layout")
    parser.add_argument("--dtype", help="override the config's dtype (auto, float32, bfloat16, float16)")
    parser.add_argument("--address", help="join this Ray cluster ('auto' or host:port) instead of the config's")
    parser.add_argument("--max-num-seqs", type=int, help="override batching.max_seqs (sequences running at once)")
    parser.add_argument("--max-model-len", type=int, help="override batching.max_seq_len (prompt + generated tokens)")
    parser.add_argument("--max-num-batched-tokens", type=int, help="override batching.max_num_batched_tokens "
                        "(tokens per step; longer prompts are prefilled in chunks)")
    parser.add_argument("--block-size", type=int, help="override batching.block_size (tokens per KV-cache block)")
    parser.add_argument("--kv-cache-memory", help="override batching.kv_cache_memory (bytes per actor holding a KV "
                        "cache: 4GiB, 512MiB, or a number)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="override batching.prefix_caching")
    parser.add_argument("--model-name", "--served-model-name", dest="model_name",
                        help="the name clients send as 'model' (default: the model directory's)")
    parser.add_argument("--api-key", default=None,
                        help="the API key clients must send (Authorization: Bearer KEY); visible to whoever can list "
                             "processes: prefer --api-key-env")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                        help="of the replica's raymoe loggers and of Ray Serve's (default info)")
    parser.add_argument("--strict-fields", action="store_true",
                        help="refuse (400) a request field raymoe does not know; default: ignore it with a warning, "
                             "as vLLM does")
    parser.add_argument("--api-key-env", default="RAYMOE_API_KEY",
                        help="environment variable holding the API key; unset or empty: no key "
                             "(default RAYMOE_API_KEY)")
    parser.add_argument("--app-name", default="raymoe", help="Serve application name (gRPC 'application' metadata)")
    parser.add_argument("--request-timeout-s", type=float, default=300.0,
                        help="deadline of every request, from its arrival; past it the request is aborted and the "
                             "client gets a 504 / DEADLINE_EXCEEDED (default 300)")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template file, or the template itself, replacing the checkpoint's")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0,
                        help="on SIGTERM / Ctrl-C, how long the requests in flight may run on before they are "
                             "failed with a 503 (default 30)")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Signals:
    """Counts SIGINT / SIGTERM: the first asks to stop, a second to stop at once."""

    def __init__(self):
        self.count = 0
        self.first, self.second = threading.Event(), threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.count += 1
        (self.first if self.count == 1 else self.second).set()

    def wait(self) -> None:
        while not self.first.wait(1.0):
            pass


def grpc_enabled(args: argparse.Namespace) -> bool:
    return args.grpc_port is not None and not args.no_grpc


def _start(args: argparse.Namespace, settings) -> None:
    from ray import serve

    from raymoe.cluster.bootstrap import connect
    from raymoe.deploy.server import GRPC_SERVICER, app_for

    connect(settings.config.ray)
    proxy_timeout_s = settings.request_timeout_s + PROXY_TIMEOUT_MARGIN_S  # only if the replica itself hangs
    grpc_options = {"port": args.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER],
                    "request_timeout_s": proxy_timeout_s} if grpc_enabled(args) else None
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": proxy_timeout_s},
                grpc_options=grpc_options)
    serve.run(app_for(settings), name=args.app_name, route_prefix="/", blocking=False)


def drain(app_name: str, timeout_s: float, skip: threading.Event) -> None:
    """Refuse new requests, wait up to ``timeout_s`` for those in flight, fail the rest (503)."""
    from ray import serve

    handle = serve.get_app_handle(app_name)
    started = time.monotonic()
    left = handle.start_draining.remote().result(timeout_s=30)
    _log(f"raymoe serve: stopping: new requests are refused (503); {left} in flight, "
         f"draining for up to {timeout_s:g}s")
    while left and time.monotonic() - started < timeout_s and not skip.is_set():
        time.sleep(DRAIN_POLL_S)
        left = handle.in_flight.remote().result(timeout_s=30)
    if left:
        failed = handle.fail_in_flight.remote(
            f"the server is shutting down and its drain deadline ({timeout_s:g}s) passed").result(timeout_s=30)
        _log(f"raymoe serve: drain deadline: failed {failed} requests still in flight (503)")
    else:
        _log(f"raymoe serve: drained in {time.monotonic() - started:.1f}s")


def app_args(args: argparse.Namespace) -> dict:
    """The application builder's arguments (``ServeArgs``) from the command line."""
    out = {"config": str(args.config), "api_key_env": args.api_key_env, "log_level": args.log_level,
           "strict_fields": args.strict_fields,
           "request_timeout_s": args.request_timeout_s, "drain_timeout_s": args.drain_timeout_s}
    for name in ("api_key", "chat_template", "model_name", "model", "expert_ranks", "layout", "dtype", "address",
                 "max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size", "enable_prefix_caching"):
        value = getattr(args, name, None)
        if value is not None and value != "":
            out[name] = value
    if getattr(args, "kv_cache_memory", None):  # a plain number is bytes
        out["kv_cache_memory"] = int(args.kv_cache_memory) if args.kv_cache_memory.isdigit() else args.kv_cache_memory
    return out


def run(args: argparse.Namespace) -> int:
    from raymoe.cluster.config import DeploymentConfigError
    from raymoe.deploy.settings import ServeArgsError, settings_from_args
    from raymoe.workers.model.errors import RaymoeModelError

    try:
        settings = settings_from_args(app_args(args))
        from raymoe.workers.model.checkpoint import Checkpoint  # torch: only once the arguments are good

        Checkpoint(settings.config.model, settings.config.moge_groups)  # a bad checkpoint fails here, before Ray
    except (DeploymentConfigError, ServeArgsError, RaymoeModelError) as exc:
        _log(f"raymoe serve: error: {exc}")
        return 2
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    joined = bool(settings.config.ray.address or os.environ.get("RAY_ADDRESS"))  # a cluster we must leave as is
    try:
        _start(args, settings)
        signals = Signals()
        base = f"http://{args.host}:{args.port}"
        grpc = f"port {args.grpc_port} (all interfaces: Ray Serve's gRPC proxy)" if grpc_enabled(args) else \
            "off (--grpc-port to serve it)"
        print(f"raymoe: serving '{settings.model_name}' at {base}/v1 (OpenAI API; {base}/health, {base}/metrics), "
              f"gRPC {grpc}{'; API key required' if settings.api_key else ''}", flush=True)
        signals.wait()
        try:
            drain(args.app_name, settings.drain_timeout_s, signals.second)
        except Exception as exc:  # the replica is gone or stuck: stop anyway
            _log(f"raymoe serve: could not drain ({exc!r}); stopping")
        return 0
    except (RaymoeModelError, RuntimeError) as exc:
        _log(f"raymoe serve: error: {exc}")
        return 1
    finally:
        if ray.is_initialized():
            with contextlib.suppress(RayServeException):  # Serve never started
                serve.delete(args.app_name)  # waits for the replica's last responses to leave it
            if not joined:  # on a cluster we joined, Serve and the cluster stay up
                serve.shutdown()
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raymoe serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
