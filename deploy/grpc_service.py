"""The gRPC service of ``deploy/raymoe.proto``: unary ``Generate`` and server-streaming
``GenerateStream``, served by Ray Serve's gRPC proxy.

Serve's proxy calls the ingress deployment's methods of the same names (``RaymoeServer``
in ``deploy/server.py``), which delegate here. A request is checked exactly as an HTTP
completion (it is turned into one, ``n = 1``); refusals set the gRPC status that matches
the HTTP one (``INVALID_ARGUMENT``, ``UNAUTHENTICATED``, ``NOT_FOUND``,
``RESOURCE_EXHAUSTED``, ``UNAVAILABLE``) with the OpenAI error message as details.
Defaults differ from the HTTP API in one place: ``temperature`` defaults to 0 (greedy).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import ValidationError

from raymoe.deploy import openai_api as api
from raymoe.deploy.completions import Submission, plan_completion
from raymoe.deploy.errors import CLIENT_CLOSED, APIError, from_validation_errors, invalid
from raymoe.deploy.grpc_stubs import UndecodableRequest
from raymoe.deploy.grpc_stubs import raymoe_pb2 as pb
from raymoe.deploy.service import ModelService


def _optional(request, name: str):
    return getattr(request, name) if request.HasField(name) else None


def to_completion(service: ModelService, request: pb.GenerateRequest) -> api.CompletionRequest:
    """A GenerateRequest as the HTTP completion request it stands for."""
    if request.prompt and len(request.prompt_ids):
        raise invalid("send 'prompt' or 'prompt_ids', not both", "prompt")
    temperature = _optional(request, "temperature")
    fields = {"model": request.model or service.name,
              "prompt": request.prompt if request.prompt else list(request.prompt_ids),
              "max_tokens": _optional(request, "max_tokens"),
              "temperature": 0.0 if temperature is None else temperature,
              "top_p": _optional(request, "top_p"), "top_k": _optional(request, "top_k"),
              "seed": _optional(request, "seed"), "stop": list(request.stop) or None, "ignore_eos": request.ignore_eos,
              "stop_token_ids": list(request.stop_token_ids) or None,
              "logit_bias": {str(k): v for k, v in request.logit_bias.items()} or None,
              "guided_json": request.guided_json or None, "guided_regex": request.guided_regex or None,
              "guided_choice": list(request.guided_choice) or None, "guided_grammar": request.guided_grammar or None,
              **{name: _optional(request, name) for name in ("presence_penalty", "frequency_penalty",
                                                              "repetition_penalty", "min_p", "min_tokens", "logprobs")}}
    try:
        return api.CompletionRequest.model_validate(fields)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None


def _metadata(context) -> dict[str, str]:
    return {key.lower(): value for key, value in context.invocation_metadata()}


def _prepare(service: ModelService, request: pb.GenerateRequest | UndecodableRequest, context) -> Submission:
    service.check_key(_metadata(context).get("authorization"))
    if isinstance(request, UndecodableRequest):
        raise invalid(f"the request is not a valid GenerateRequest ({request.reason}): strings must be UTF-8 "
                      "and the message well-formed", None)
    return plan_completion(service, to_completion(service, request))


def _usage(prompt_tokens: int, completion_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens)


def _logprobs(service: ModelService, entries) -> list[pb.TokenLogprob]:
    text_of = service.encoder.token_text
    return [pb.TokenLogprob(token_id=e.token, token=text_of(e.token), logprob=e.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=t, token=text_of(t), logprob=v) for t, v in e.top])
            for e in entries]


def _refuse(context, exc: APIError) -> None:
    context.set_code(exc.grpc_code)
    context.set_details(exc.message)


async def generate(service: ModelService, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
    status = 500
    try:
        plan = _prepare(service, request, context)
        streams = await service.start(plan.prompts, plan.params, plan.prompt_param)
        [choice] = await service.collect(streams, plan.stops)
        status = 200
        return pb.GenerateResponse(id=api.new_id("gen"), model=service.name, text=choice.text,
                                   token_ids=choice.token_ids, finish_reason=choice.finish_reason,
                                   usage=_usage(plan.prompt_tokens, len(choice.token_ids)),
                                   logprobs=_logprobs(service, choice.logprobs))
    except APIError as exc:
        status = exc.status
        _refuse(context, exc)
        return pb.GenerateResponse()
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        service.metrics.count_request("grpc:Generate", status)


async def generate_stream(service: ModelService, request: pb.GenerateRequest,
                          context) -> AsyncIterator[pb.GenerateChunk]:
    status, rid = 500, api.new_id("gen")
    try:
        plan = _prepare(service, request, context)
        streams = await service.start(plan.prompts, plan.params, plan.prompt_param)
        generated = 0
        async with aclosing(service.stream(streams, plan.stops)) as pieces:
            async for piece in pieces:
                generated += len(piece.token_ids)
                final = piece.finish_reason is not None
                yield pb.GenerateChunk(id=rid, text=piece.text, token_ids=piece.token_ids,
                                       finish_reason=piece.finish_reason or "",
                                       usage=_usage(plan.prompt_tokens, generated) if final else None,
                                       logprobs=_logprobs(service, piece.logprobs))
        status = 200
    except APIError as exc:
        status = exc.status
        _refuse(context, exc)
        # A stream that ends without a message never hands Serve's proxy the context: the
        # status set above reaches the client only with an exception (Serve wraps it).
        raise
    except (asyncio.CancelledError, GeneratorExit):
        status = CLIENT_CLOSED
        raise
    finally:
        service.metrics.count_request("grpc:GenerateStream", status)
