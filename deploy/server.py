"""The Ray Serve application: one replica that owns one raymoe deployment (front-end +
expert-rank actors) and serves it over HTTP (OpenAI API) and gRPC.

    serve run deploy/serve_config.yaml                 # or: serve deploy ...
    serve run raymoe.deploy.server:build_app config=deploy/configs/tiny.yaml
    python -m raymoe.deploy.serve_cli --config deploy/configs/tiny.yaml   # `raymoe serve`

``build_app(args)`` is the Serve application builder; its arguments are read once, at the
edge, by ``deploy/settings.py``.
"""

from __future__ import annotations

import logging

from ray import serve

from raymoe.deploy import grpc_service
from raymoe.deploy.engine_loop import EngineLoop
from raymoe.deploy.http_api import build_http_app
from raymoe.deploy.metrics import ServingMetrics
from raymoe.deploy.prompts import PromptEncoder
from raymoe.deploy.service import ModelService
from raymoe.deploy.settings import ServeArgs, ServeArgsError, ServerSettings, settings_from_args  # noqa: F401 (re-exported)

log = logging.getLogger("raymoe.serve")

GRPC_SERVICER = "raymoe.deploy.grpc_stubs.add_RaymoeServiceServicer_to_server"
HEADROOM_REQUESTS = 64  # Serve requests a replica takes beyond the engine's slots + queue (health, metrics)


@serve.deployment(name="raymoe", ray_actor_options={"num_cpus": 0}, health_check_period_s=5,
                  health_check_timeout_s=60)
@serve.ingress()
class RaymoeServer:
    """The ingress replica: HTTP routes come from ``__serve_build_asgi_app__``; the gRPC
    proxy calls ``Generate`` and ``GenerateStream`` by name."""

    def __init__(self, settings: ServerSettings):
        from raymoe.cluster.coordinator import Deployment

        logging.getLogger("raymoe").setLevel(settings.log_level.upper())
        config = settings.config
        self.engine = Deployment(config)  # Ray is already up in a replica: this joins it
        model = self.engine.model_config
        context_len = min(config.batching.max_seq_len, model.max_position_embeddings)
        metrics = ServingMetrics(settings.model_name, model.moe_layer_ids)
        self.loop = EngineLoop(self.engine, metrics, max_wait_s=config.batching.max_wait_s).start()
        generation = self.engine.generation
        encoder = PromptEncoder(self.engine.tokenizer, model.vocab_size, context_len, generation.sampling(),
                                settings.chat_template)
        self.service = ModelService(settings.model_name, self.loop, encoder, metrics, settings.api_key,
                                    settings.request_timeout_s, settings.strict_fields, root=config.model)
        log.info("raymoe serving %s: %s layout, %d expert ranks, context %d, max_seqs %d", settings.model_name,
                 config.layout, config.expert_ranks, context_len, config.batching.max_seqs)
        log.info("chat template: %s; sampling defaults: %s; end-of-sequence ids: %s", encoder.chat.source,
                 f"{generation.sampling()} from {generation.source}" if generation.sampling() else "the API's",
                 list(self.engine.scheduler.eos_token_ids) or "none")

    def __serve_build_asgi_app__(self):
        return build_http_app(self.service)

    async def Generate(self, request, grpc_context):  # noqa: N802 (the gRPC method's name)
        return await grpc_service.generate(self.service, request, grpc_context)

    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        async for chunk in grpc_service.generate_stream(self.service, request, grpc_context):
            yield chunk

    # -- draining (called by `raymoe serve` through a deployment handle, never by clients:
    # the gRPC proxy routes only the .proto's methods, HTTP only the FastAPI routes) ----
    async def start_draining(self) -> int:
        """Refuse new requests (503) from now on; returns how many are in flight."""
        return self.service.start_draining()

    async def in_flight(self) -> int:
        return self.service.in_flight()

    async def fail_in_flight(self, reason: str) -> int:
        return self.service.fail_in_flight(reason)

    def check_health(self) -> None:
        """Serve replaces the replica (and so the deployment) when its engine loop died."""
        self.loop.check_running()

    def __del__(self):
        if getattr(self, "loop", None) is not None:
            self.loop.stop()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()


def build_app(args: dict) -> serve.Application:
    """Serve's application builder (``import_path: raymoe.deploy.server:build_app``)."""
    return app_for(settings_from_args(args))


def app_for(settings: ServerSettings) -> serve.Application:
    """When Serve itself stops the replica (``serve shutdown``, a redeploy), the requests in
    flight get ``drain_timeout_s`` to finish, as under ``raymoe serve``."""
    b = settings.config.batching
    return RaymoeServer.options(max_ongoing_requests=b.max_seqs + b.max_queue + HEADROOM_REQUESTS,
                                graceful_shutdown_timeout_s=max(settings.drain_timeout_s, 1.0),
                                graceful_shutdown_wait_loop_s=0.5,
                                logging_config={"log_level": settings.log_level.upper()}).bind(settings)
