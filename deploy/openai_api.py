"""OpenAI request and response shapes: ``/v1/completions`` and ``/v1/chat/completions``.

Requests are pydantic models with unknown fields forbidden and strict types (a string
is not a number), so a bad request is refused before it reaches the model. Known OpenAI
fields that raymoe does not implement are accepted at their neutral value and refused
otherwise (``unsupported_fields``), naming the field. ``top_k``, ``ignore_eos`` and
``stop_token_ids`` are extensions, as in vLLM (the openai client sends them through
``extra_body``). Responses are plain dicts in OpenAI's shape.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token (workers/sampling.MAX_LOGPROBS)
MAX_STOP = 4  # stop strings per request, as OpenAI
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: pass temperature=0 for greedy decoding
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

StopString = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """Fields both endpoints share. A request may carry fields raymoe does not know
    (LangChain, LiteLLM and agent frameworks send OpenAI's newer ones: ``store``,
    ``metadata``, ``parallel_tool_calls``, ...): they are kept aside (``unknown_fields``)
    for the server to ignore with a warning, as vLLM does, or refuse in strict mode.
    Fields inside messages stay strict."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, description="the served model's name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; prompt + max_tokens <= context")
    temperature: float | None = Field(None, ge=0, le=2, description=f"default {DEFAULT_TEMPERATURE}; 0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same tokens")
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="minus this once for a token in the output")
    frequency_penalty: float | None = Field(None, ge=-2, le=2,
                                            description="minus this times the token's count in the output")
    logit_bias: dict[str, float] | None = Field(None, description="token id (a string) -> added to its logit, "
                                                                  "in [-100, 100]")
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1, description="extension: keep the k most likely tokens; 0 or -1 = off")
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence")
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = Field(None, description="extension")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="extension: a seen token's logit "
                                             "divided (positive) or multiplied (negative) by it; 1 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="extension: drop tokens below min_p times the "
                                "most likely one's probability")
    min_tokens: int | None = Field(None, ge=0, description="extension: no end-of-sequence or stop before this many")
    guided_json: dict | str | None = Field(None, description="extension (vLLM's): the output follows this JSON schema")
    guided_regex: str | None = Field(None, description="extension (vLLM's): the output matches this regex")
    guided_choice: list[str] | None = Field(None, description="extension (vLLM's): the output is one of these")
    guided_grammar: str | None = Field(None, description="extension (vLLM's): the output follows this Lark grammar")

    def guides(self) -> list[tuple[str, tuple[str, str]]]:
        """Every structured-output constraint the request sets: (field, (kind, value))."""
        out = []
        if self.guided_json is not None:
            schema = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            out.append(("guided_json", ("json_schema", schema)))
        if self.guided_regex is not None:
            out.append(("guided_regex", ("regex", self.guided_regex)))
        if self.guided_choice is not None:
            out.append(("guided_choice", ("choice", json.dumps(self.guided_choice))))
        if self.guided_grammar is not None:
            out.append(("guided_grammar", ("grammar", self.guided_grammar)))
        return out

    def unknown_fields(self) -> list[str]:
        """Top-level fields of the request that raymoe does not know, sorted."""
        return sorted(self.model_extra or {})

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


Prompt = (Annotated[str, Field(description="text")] | list[str] | list[TokenId]
          | list[Annotated[list[TokenId], Field(description="token ids")]])


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = Field(False, description="the prompt before the completion in the text (and its tokens' "
                       "logprobs first, with logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the sampled token's logprob and the "
                                 f"N most likely alternatives' (0-{MAX_LOGPROBS}) for every generated token")
    best_of: int | None = Field(None, description="not supported: null or 1")
    suffix: str | None = Field(None, description="not supported: null")

    def unsupported_fields(self) -> list[str]:
        flags = {"best_of": self.best_of not in (None, 1), "suffix": self.suffix is not None}
        return [name for name, bad in flags.items() if bad]

    def requested_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the calls it made")
    tool_call_id: str | None = Field(None, description="tool: the call this message answers")

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, description="preferred over max_tokens when both are set")
    logprobs: bool | None = Field(None, description="return each generated token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the N most likely "
                                     f"alternatives of each token (0-{MAX_LOGPROBS})")
    response_format: ResponseFormat | None = Field(None, description="text, json_object, or json_schema with its "
                                                   "schema: the output follows it (structured output)")
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        None, description="functions the model may call (rendered by the chat template; calls parsed from its output)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required (at least one call), or a named "
                          "function; required and named calls are valid JSON by construction")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extension (as in vLLM): more variables for the chat template, e.g. {'enable_thinking': false}")

    def unsupported_fields(self) -> list[str]:
        return []

    def guides(self) -> list[tuple[str, tuple[str, str]]]:
        out = super().guides()
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            out.append(("response_format", ("json_object", "")))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise ValueError("response_format.json_schema")
            out.append(("response_format", ("json_schema", json.dumps(fmt.json_schema.schema_))))
        return out

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def message_dicts(self) -> list[dict]:
        """The messages as chat templates take them (a call's arguments as an object, when
        they are a JSON object, as HF templates expect)."""
        out = []
        for m in self.messages:
            d = {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out

    def tool_dicts(self) -> list[dict] | None:
        """The tools for the chat template (none when ``tool_choice`` is ``none``)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM's): a ``prompt``, or chat ``messages`` rendered by the chat
    template (with the assistant's turn opened), to token ids."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = Field(False, description="also each token's text")


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM's): token ids to text."""

    model: str | None = None
    tokens: list[TokenId]


def _json_or_text(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {...}}``."""

    error: ErrorDetail


# -- responses --------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """``choices``: ``{"index", "text", "finish_reason"}`` each, and ``"logprobs"`` when
    asked for (``deploy/logprobs.py``)."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": [{"logprobs": None, **c} for c in choices],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]}


def chat_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """``choices``: ``{"index", "text", "finish_reason"}`` each, and ``"logprobs"`` when
    asked for (``deploy/logprobs.py``)."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"],
                                                          **({"tool_calls": c["tool_calls"]} if "tool_calls" in c else {})},
                         "finish_reason": c["finish_reason"], "logprobs": c.get("logprobs")} for c in choices],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def model_card(name: str, created: int, context_len: int, root: str = "") -> dict:
    """The ``/v1/models`` entry: vLLM's fields (``max_model_len``; ``root``: the model
    directory served; no ``parent``)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "raymoe", "max_model_len": context_len,
            "root": root or name, "parent": None}
