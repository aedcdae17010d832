"""Live servers for the end-to-end tests: Ray Serve on the session's Ray instance, with the
raymoe application deployed from its real builder, reached by real clients over loopback.
The fixtures live as long as this package's tests (Serve is shut down after them).

Two applications share one Serve instance (one HTTP port, one gRPC port), each owning its
own raymoe deployment of a tiny Mixtral with a character tokenizer and a chat template:

- ``server``: route ``/``, front-end + 2 expert ranks, no API key, 16 KV slots, a deep
  queue (the main suite);
- ``guarded_server``: route ``/guarded``, 1 expert rank, an API key, 2 KV slots and a queue of 2, so a
  few requests fill it (429s, client disconnects, auth).

The fault tests share a third, ``fault_server`` (``/faults``, 1 expert rank), which each
leaves serving again except the drain, its last user.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import save_char_tokenizer, save_tiny_model

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
MODEL_NAME = "tiny-chat"
GUARDED_KEY = "test-key-0123456789"
CONTEXT = 128  # batching.max_seq_len of both apps (the model allows 256)
FAULT_APP = "faults"  # the application the fault tests share (fault_server)


@dataclass(frozen=True)
class Server:
    base_url: str  # http://127.0.0.1:PORT[/prefix]
    grpc_target: str  # 127.0.0.1:PORT
    app: str  # Serve application name (gRPC "application" metadata)
    model: str
    model_dir: Path
    api_key: str | None = None

    @property
    def openai_base(self) -> str:
        return f"{self.base_url}/v1"

    def grpc_metadata(self, key: str | None = None) -> tuple:
        key = key if key is not None else self.api_key
        return (("application", self.app),) + ((("authorization", f"Bearer {key}"),) if key else ())

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="package")
def chat_model(tmp_path_factory) -> Path:
    """A tiny Mixtral (6 experts, top-2, 3 layers) with a 96-character tokenizer and a chat template."""
    path = tmp_path_factory.mktemp("tiny-chat")
    save_tiny_model("mixtral", path, seed=11)
    save_char_tokenizer(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="package")
def serve_instance(ray_session):
    """Ray Serve on the session's Ray: HTTP and gRPC proxies on free loopback ports."""
    from ray import serve

    from raymoe.deploy.server import GRPC_SERVICER

    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]})
    yield http_port, grpc_port
    serve.shutdown()


def _deploy(tmp_path_factory, serve_instance, model_dir: Path, app: str, prefix: str, batching: dict,
            api_key: str | None, expert_ranks: int = 2, strict_fields: bool = False) -> Server:
    from ray import serve

    from raymoe.deploy.server import build_app

    config = {"model": str(model_dir), "expert_ranks": expert_ranks, "resources": {"cpus_per_actor": 0.1},
              "batching": {"max_seq_len": CONTEXT, **batching}}
    path = tmp_path_factory.mktemp(app) / "deployment.yaml"
    path.write_text(yaml.safe_dump(config))
    args = {"config": str(path), "model_name": MODEL_NAME, "strict_fields": strict_fields,
            **({"api_key": api_key} if api_key else {})}
    started = time.time()
    serve.run(build_app(args), name=app, route_prefix=prefix)
    print(f"\n[e2e] app {app!r} up in {time.time() - started:.1f}s")
    http_port, grpc_port = serve_instance
    base = f"http://127.0.0.1:{http_port}" + ("" if prefix == "/" else prefix)
    return Server(base, f"127.0.0.1:{grpc_port}", app, MODEL_NAME, model_dir, api_key)


@pytest.fixture(scope="package")
def server(tmp_path_factory, serve_instance, chat_model) -> Server:
    return _deploy(tmp_path_factory, serve_instance, chat_model, "main", "/",
                   {"max_seqs": 16, "max_queue": 256}, None)


@pytest.fixture(scope="package")
def guarded_server(tmp_path_factory, serve_instance, chat_model) -> Server:
    return _deploy(tmp_path_factory, serve_instance, chat_model, "guarded", "/guarded",
                   {"max_seqs": 2, "max_queue": 2}, GUARDED_KEY, expert_ranks=1, strict_fields=True)


@pytest.fixture(scope="package")
def fault_server(tmp_path_factory, serve_instance, chat_model) -> Server:
    """Application ``faults`` at ``/faults`` (1 expert rank), for the tests that break or
    stop a served deployment, in this order: an expert rank killed (test_actor_death), the
    replica killed (test_replica_death: Serve builds a new one), then the drain
    (test_shutdown), which leaves it refusing requests: it is the last to use it."""
    from tests.e2e.own_apps import delete_app, deploy_own_app

    server = deploy_own_app(tmp_path_factory.mktemp("faults"), serve_instance, chat_model, FAULT_APP,
                            {"max_seqs": 16, "max_queue": 16, "max_seq_len": 256})
    yield server
    delete_app(FAULT_APP)


@pytest.fixture(scope="package")
def reference(chat_model):
    """The single-process reference engine on the same model, one sequence at a time:
    the text each request would get alone."""
    from raymoe.workers.reference import ReferenceEngine

    return ReferenceEngine.from_pretrained(chat_model, max_seqs=1, max_seq_len=CONTEXT)


def alone(reference, prompt: str | list[int], **params):
    """The reference's completion of one prompt, generated alone."""
    from raymoe.workers.sampling import SamplingParams

    ids = reference.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return reference.generate_ids([ids], SamplingParams(**params))[0]


def metric_samples(text: str) -> dict[tuple, float]:
    """Prometheus text -> {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)
