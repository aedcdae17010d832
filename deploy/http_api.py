"""The OpenAI-compatible HTTP API (FastAPI), served by the Serve replica.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` as Server-Sent Events ending in ``data: [DONE]``), ``GET /v1/models``,
``GET /v1/models/{model}``, ``GET /health``, ``GET /metrics``. Every error is an OpenAI
error object (``deploy/errors.py``); nothing a client sends reaches the model unchecked
or takes the server down.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from raymoe.deploy import openai_api as api
from raymoe.deploy.completions import (
    Submission,
    chunks,
    open_stream,
    plan_chat,
    plan_completion,
    respond,
)
from raymoe.deploy.errors import CLIENT_CLOSED, APIError, from_validation_errors, invalid
from raymoe.deploy.metrics import CONTENT_TYPE_LATEST
from raymoe.deploy.service import ModelService

log = logging.getLogger("raymoe.serve")

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/admin/plan", "/health", "/metrics",
          "/tokenize", "/detokenize", "/version")
OPEN_ROUTES = ("/health",)  # the only routes that need no API key
MAX_BODY_BYTES = 8 << 20
ERRORS = {status: {"model": api.ErrorBody, "description": text} for status, text in (
    (400, "invalid request (OpenAI error object)"), (401, "missing or wrong API key"),
    (404, "unknown model or route"), (413, f"request body over {MAX_BODY_BYTES} bytes"),
    (429, "queue full; see Retry-After"), (503, "engine not serving"))}
STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                  "description": "the response, or with stream=true Server-Sent Events ending in [DONE]"}}


def route_label(scope: dict) -> str:
    """A bounded label for metrics: a known route, or 'other'."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ROUTES else "other"


class EdgeMiddleware:
    """Before any parsing: the body size limit and the API key (every route but
    /health); after the response: the request counter by route and status."""

    def __init__(self, app, service: ModelService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, status = route_label(scope), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if route not in OPEN_ROUTES:
                self.service.check_key(headers.get("authorization"))
            if int(headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise _too_large(int(headers["content-length"]), "Content-Length")
        except (APIError, ValueError) as exc:
            exc = exc if isinstance(exc, APIError) else invalid(f"bad Content-Length ({exc})", None)
            await _error_response(exc)(scope, receive, send_status)
        else:
            try:
                await self.app(scope, _counted(receive), send_status)
            except asyncio.CancelledError:  # the client went away before the response started
                status = CLIENT_CLOSED if status == 500 else status
                raise
        finally:
            self.service.metrics.count_request(route, status)


def _counted(receive):
    """``receive`` that refuses a body past MAX_BODY_BYTES as it arrives: a chunked body
    has no Content-Length to check up front."""
    received = 0

    async def receive_counted():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise _too_large(received, "so far, sent without Content-Length")
        return message

    return receive_counted


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), exc.status, exc.headers())


def _too_large(size: int, how: str) -> APIError:
    return APIError(413, f"request body of {size} bytes ({how}); the limit is {MAX_BODY_BYTES}",
                    "invalid_request_error", None, "request_too_large")


def _unparsable_body(cause: BaseException) -> APIError:
    """Why FastAPI could not turn the body into JSON (it reports only "There was an error
    parsing the body"): nesting deeper than Python's recursion limit, bytes that are not
    UTF-8, a number too long to convert, or a refusal raised while reading (413)."""
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, RecursionError):
        return invalid("the body is nested too deeply to parse as JSON: send arrays and objects nested at most a "
                       "few hundred levels", None)
    if isinstance(cause, UnicodeDecodeError):
        return invalid(f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start}): send JSON text "
                       "encoded as UTF-8", None)
    detail = str(cause)
    detail = detail if len(detail) <= 200 else detail[:197] + "..."
    return invalid(f"the body is not valid JSON ({type(cause).__name__}: {detail})", None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error_response(from_validation_errors(exc.errors(), skip=1))  # loc[0] is 'body'

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not read or parse the body
            return _error_response(_unparsable_body(exc.__cause__))
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error_response(APIError(exc.status_code, message, kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"internal error ({type(exc).__name__}); the server is still serving",
                                        "server_error"))


async def _sse(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-Sent Events: one ``data:`` line per chunk, an error object if the engine
    fails mid-stream, then ``data: [DONE]``. Closing it (client gone) aborts the requests."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


async def _serve(service: ModelService, plan: Submission, chat: bool, req: api.SamplingFields):
    if not req.stream:
        return await respond(service, plan, chat)
    streams = await open_stream(service, plan)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    events = chunks(service, plan, streams, chat, include_usage)
    return StreamingResponse(_sse(events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class PlanChange(BaseModel):
    """``POST /v1/admin/plan``: the YAML text of a plan written by `raymoe plan`."""

    model_config = ConfigDict(extra="forbid")
    plan: str = Field(min_length=1, max_length=MAX_BODY_BYTES)


def _document_errors_as_served(app: FastAPI) -> None:
    """The spec lists the errors the server answers: a request that fails validation gets
    the 400 OpenAI error (``install_error_handlers``), never FastAPI's default 422."""
    default = app.openapi

    def openapi() -> dict:
        schema = default()
        for item in schema["paths"].values():
            for operation in item.values():
                operation["responses"].pop("422", None)
        return schema

    app.openapi = openapi


def _version() -> str:
    try:
        return importlib.metadata.version("raymoe")
    except importlib.metadata.PackageNotFoundError:  # a checkout run without installing it
        return "unknown"


def build_http_app(service: ModelService) -> FastAPI:
    app = FastAPI(title="raymoe", version="0.1.0",
                  description="OpenAI-compatible serving of a Mixture-of-Experts model on Ray (docs/serving.md)")
    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, service=service)
    _document_errors_as_served(app)

    @app.post("/v1/completions", responses={**STREAMED, **ERRORS})
    async def completions(body: api.CompletionRequest):
        return await _serve(service, plan_completion(service, body), False, body)

    @app.post("/v1/chat/completions", responses={**STREAMED, **ERRORS})
    async def chat_completions(body: api.ChatCompletionRequest):
        return await _serve(service, plan_chat(service, body), True, body)

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [api.model_card(service.name, service.created, service.encoder.context_len,
                                                          service.root)]}

    @app.get("/v1/models/{model:path}", responses=ERRORS)
    async def model(model: str):
        service.check_model(model or "-")
        return api.model_card(service.name, service.created, service.encoder.context_len, service.root)

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize(body: api.TokenizeRequest):
        """A prompt, or chat messages through the chat template, to token ids (vLLM's route)."""
        service.check_model(body.model or "")
        if (body.prompt is None) == (body.messages is None):
            raise invalid("send 'prompt' or 'messages', exactly one of them", "prompt")
        encoder = service.encoder
        if body.prompt is not None:
            ids = encoder.tokenize(body.prompt)
        else:
            ids = encoder.chat_prompt([{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                                       for m in body.messages], body.chat_template_kwargs)
        return {"count": len(ids), "max_model_len": encoder.context_len, "tokens": ids,
                "token_strs": [encoder.token_text(t) for t in ids] if body.return_token_strs else None}

    @app.post("/detokenize", responses=ERRORS)
    async def detokenize(body: api.DetokenizeRequest):
        """Token ids to text (vLLM's route)."""
        service.check_model(body.model or "")
        return {"prompt": service.encoder.decode(service.encoder.known_ids(body.tokens, "tokens"))}

    @app.get("/version", responses=ERRORS)
    async def version():
        return {"version": _version()}

    @app.post("/v1/admin/plan", responses=ERRORS)
    async def set_plan(body: PlanChange):
        """Load a new placement plan into the running deployment (expert weights move
        between the ranks between two steps; requests in flight carry on)."""
        return await service.set_plan(body.plan)

    @app.get("/health", responses={413: ERRORS[413], 503: {
        "description": "not ready: an actor or the engine loop is down", "content": {"application/json": {}}}})
    async def health():
        h = await service.health()
        body = {"status": "ok" if h.ready else "unavailable", "actors": h.actors, "alive": h.alive,
                "reason": h.reason or None}
        return JSONResponse(body, 200 if h.ready else 503)

    @app.get("/metrics", response_class=Response, responses={k: ERRORS[k] for k in (401, 413)})
    async def metrics():
        service.metrics.engine_up.set(1 if service.loop.running else 0)
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
