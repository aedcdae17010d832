"""Errors a client can see, in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal is an ``APIError`` carrying the HTTP status (and the gRPC status it maps
to), the field at fault and the real value; engine errors (``RequestError``,
``SamplingParamsError``, ``QueueFullError``) are translated here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from raymoe.workers.engine import QueueFullError
from raymoe.workers.sampling import SamplingParamsError
from raymoe.workers.scheduler import RequestError

# engine field name -> the OpenAI request field a client sent
ENGINE_TO_API_FIELD = {"max_new_tokens": "max_tokens", "prompt": "prompt", "stop": "stop", "seed": "seed",
                       "temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}

CLIENT_CLOSED = 499  # the status counted for a request whose client went away (nginx's convention)

GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class APIError(Exception):
    """A request refused with ``status``; ``param`` names the request field at fault."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None  # 429 only: the Retry-After header

    def __post_init__(self):
        super().__init__(self.message)

    def __reduce__(self):  # picklable (Ray carries it between processes)
        return APIError, (self.status, self.message, self.type, self.param, self.code, self.retry_after_s)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return GRPC_CODES.get(self.status, grpc.StatusCode.INTERNAL)


def invalid(message: str, param: str | None, code: str | None = None) -> APIError:
    """400: the request is well-formed JSON but cannot be served as given."""
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, served: str) -> APIError:
    """404 naming the model asked for (cut to 200 characters: a 1 MB name gets a short answer)."""
    shown = model if len(model) <= 200 else model[:197] + "..."
    return APIError(404, f"The model '{shown}' does not exist; this server serves '{served}' (GET /v1/models)",
                    "invalid_request_error", "model", "model_not_found")


def unauthorized(reason: str) -> APIError:
    return APIError(401, f"{reason}: send 'Authorization: Bearer <key>' with the server's API key",
                    "authentication_error", None, "invalid_api_key")


def unavailable(reason: str) -> APIError:
    return APIError(503, f"the model is not serving: {reason}", "server_error", None, "engine_unavailable")


def shutting_down() -> APIError:
    """503 while the server drains: the requests in flight finish, new ones go elsewhere."""
    return APIError(503, "the server is shutting down: it finishes the requests in flight and accepts no new "
                    "ones; retry on another replica", "server_error", None, "server_shutting_down")


def deadline_exceeded(timeout_s: float) -> APIError:
    """504: the request ran past the server's ``request_timeout_s`` and was aborted."""
    return APIError(504, f"the request did not finish within the server's deadline of {timeout_s:g} s "
                    "(request_timeout_s) and was aborted; ask for fewer tokens or retry later", "server_error",
                    None, "deadline_exceeded")


def from_engine_error(exc: Exception, prompt_param: str = "prompt") -> APIError:
    """The engine refused a request: name the field the client sent."""
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is busy: {exc} (after the Retry-After seconds)", "rate_limit_error",
                        None, "queue_full", retry_after_s=max(1, exc.retry_after_s or 1))
    if isinstance(exc, (RequestError, SamplingParamsError)):
        param = ENGINE_TO_API_FIELD.get(exc.field, exc.field)
        if param == "prompt":
            param = prompt_param
        return invalid(f"'{param}' = {exc.value!r}: expected {exc.expected}", param)
    raise TypeError(f"not an engine request error: {exc!r}")


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's union-member loc entries


def from_validation_errors(errors: list[dict], skip: int = 0) -> APIError:
    """pydantic's validation errors -> one 400 naming the first bad field and its value.
    ``skip``: leading ``loc`` entries that are not fields (FastAPI's "body")."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return invalid(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None)
    path = []
    for part in first.get("loc", ())[skip:]:
        if isinstance(part, str) and ("[" in part or "-" in part or part in UNION_TAGS):
            break  # the rest names a member of a union type, not a field
        path.append(str(part))
    param = ".".join(path) or None
    if param is None and first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        raw = first.get("input")
        kind = "not JSON" if isinstance(raw, (bytes, str)) else f"a JSON {type(raw).__name__}"
        return invalid(f"the body must be a JSON object (with 'Content-Type: application/json'); it is {kind}", None)
    if first.get("type") == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param)
    if first.get("type") == "missing":
        return invalid(f"'{param}' is required" if param else "a JSON object body is required", param)
    value = repr(first.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    return invalid(f"'{param}' = {value}: {first.get('msg')}" if param else f"{first.get('msg')}: {value}", param)
