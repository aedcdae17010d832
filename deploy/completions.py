"""OpenAI completion and chat requests -> engine submissions -> responses and chunks.

A request becomes one engine request per (prompt, choice): choice ``j`` of a seeded
request gets seed ``seed + j``, so choice 0 equals a single request with that seed. Choice
indices are ``prompt_index * n + j``, as in OpenAI's API. Usage counts each prompt once
and every generated token (end-of-sequence included).
"""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import AsyncIterator

from raymoe.deploy import logprobs, tool_calls
from raymoe.deploy import openai_api as api
from raymoe.deploy.errors import invalid
from raymoe.deploy.prompts import Limits
from raymoe.deploy.service import ModelService, Piece
from raymoe.workers.guided import GuideError, check_guide
from raymoe.workers.sampling import SamplingParams


@dataclass(frozen=True)
class Submission:
    """What to submit: one entry per choice, in choice-index order."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    stops: list[tuple[str, ...]]
    prompt_tokens: int  # each prompt counted once
    prompt_param: str  # the request field that holds the prompt ("prompt" or "messages")
    echoes: list[str] | None = None  # completions with echo: each choice's prompt text, put before its text
    tool_choice: object = None  # chat with tools: "auto", "required" or a NamedToolChoice (deploy/tool_calls.py)


def _guide(service: ModelService, req: api.SamplingFields) -> tuple[str, str] | None:
    """The request's structured-output constraint (its own, or the one ``tool_choice``
    ``required`` or a named function implies), compiled once here so that a bad one is a
    400 naming its field (``workers/guided.py``)."""
    try:
        guides = req.guides()
    except ValueError:
        raise invalid("'response_format' of type json_schema needs its 'json_schema': {'name': ..., 'schema': {...}}",
                      "response_format") from None
    forced = tool_calls.forced_guide(req.tools, req.tool_choice) if getattr(req, "tools", None) else None
    if forced is not None:
        guides.append(("tool_choice", forced))
    if not guides:
        return None
    if len(guides) > 1:
        raise invalid(f"set one structured-output constraint, not {len(guides)} ({', '.join(f for f, _ in guides)})",
                      guides[1][0])
    field, guide = guides[0]
    if service.encoder.tokenizer is None:
        raise invalid("structured output needs the model's tokenizer, which it does not have", field)
    try:
        tokenizer = service.encoder.guide_tokenizer()
    except GuideError as exc:
        raise invalid(exc.reason, field) from None
    try:
        check_guide(guide, tokenizer)
    except GuideError as exc:
        raise invalid(f"'{field}' cannot be compiled: {exc.reason}", field) from None
    return guide


def _limits(req: api.SamplingFields, max_tokens: int | None, defaults: dict) -> Limits:
    """The request's sampling fields; one it leaves out takes the checkpoint's default
    (generation_config.json, ``defaults``), else the API's."""
    if req.top_k is None:
        top_k = defaults.get("top_k", 0)
    else:
        top_k = req.top_k if req.top_k > 0 else 0
    temperature = req.temperature if req.temperature is not None else defaults.get("temperature",
                                                                                    api.DEFAULT_TEMPERATURE)
    return Limits(max_tokens=max_tokens, temperature=temperature,
                  top_p=req.top_p if req.top_p is not None else defaults.get("top_p", 1.0), top_k=top_k, seed=req.seed,
                  stop=req.stop_strings(), stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
                  presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                  repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
                  logit_bias=req.logit_bias, min_p=req.min_p or 0.0, min_tokens=req.min_tokens or 0,
                  logprobs=req.requested_logprobs(),
                  prompt_logprobs=req.requested_logprobs() if getattr(req, "echo", False) else None)


def _refuse_unsupported(fields: list[str]) -> None:
    if fields:
        raise invalid(f"'{fields[0]}' is not supported by raymoe: leave it out (or send its neutral value)", fields[0])


def _submission(service: ModelService, req: api.SamplingFields, prompts: list[list[int]],
                max_tokens: list[int | None], prompt_param: str) -> Submission:
    params, all_prompts = [], []
    guide = _guide(service, req)
    for prompt, tokens in zip(prompts, max_tokens):
        limits = replace(_limits(req, tokens, service.encoder.defaults), guide=guide)
        base = service.encoder.sampling_params(limits, len(prompt), prompt_param)
        for j in range(req.n):
            seed = None if req.seed is None else (req.seed + j) % 2**63
            params.append(base if j == 0 else replace(base, seed=seed))
            all_prompts.append(prompt)
    stops = [req.stop_strings()] * len(all_prompts)
    return Submission(all_prompts, params, stops, sum(map(len, prompts)), prompt_param)


def plan_completion(service: ModelService, req: api.CompletionRequest) -> Submission:
    service.check_fields(req.unknown_fields())
    service.check_model(req.model)
    _refuse_unsupported(req.unsupported_fields())
    prompts = service.encoder.completion_prompts(req.prompt)
    room = service.encoder.context_len
    tokens = [req.max_tokens if req.max_tokens is not None else min(api.DEFAULT_COMPLETION_TOKENS, room - len(p))
              for p in prompts]
    plan = _submission(service, req, prompts, tokens, "prompt")
    if not req.echo:
        return plan
    texts = [req.prompt] if isinstance(req.prompt, str) else \
        [p if isinstance(p, str) else service.encoder.decode(ids) for p, ids in zip(_prompt_list(req.prompt), prompts)]
    return replace(plan, echoes=[text for text in texts for _ in range(req.n)])


def _prompt_list(prompt) -> list:
    """The request's prompts, one entry each: a string, or a list of token ids."""
    if prompt and isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return [prompt]
    return list(prompt)


def plan_chat(service: ModelService, req: api.ChatCompletionRequest) -> Submission:
    service.check_fields(req.unknown_fields())
    service.check_model(req.model)
    _refuse_unsupported(req.unsupported_fields())
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    _check_tools(req)
    prompt = service.encoder.chat_prompt(req.message_dicts(), req.chat_template_kwargs, req.tool_dicts())
    plan = _submission(service, req, [prompt], [req.requested_tokens()], "messages")
    if req.tools and req.tool_choice != "none":
        plan = replace(plan, tool_choice=req.tool_choice or "auto")
    return plan


def _check_tools(req: api.ChatCompletionRequest) -> None:
    choice = req.tool_choice
    if choice not in (None, "none", "auto") and not req.tools:
        raise invalid("'tool_choice' other than none or auto needs 'tools'", "tool_choice")
    if choice is not None and not isinstance(choice, str) and \
            choice.function.name not in {t.function.name for t in req.tools}:
        raise invalid(f"'tool_choice' names '{choice.function.name}', which is not among 'tools'", "tool_choice")
    for i, m in enumerate(req.messages):
        if m.role == "tool" and not m.tool_call_id:
            raise invalid("a 'tool' message needs the 'tool_call_id' it answers", f"messages.{i}.tool_call_id")
        if m.tool_calls and m.role != "assistant":
            raise invalid("only an 'assistant' message has 'tool_calls'", f"messages.{i}.tool_calls")


async def respond(service: ModelService, plan: Submission, chat: bool) -> dict:
    """The whole response (non-streaming)."""
    streams = await service.start(plan.prompts, plan.params, plan.prompt_param)
    choices = await service.collect(streams, plan.stops)
    echoes = plan.echoes or [""] * len(choices)
    rows = [{"index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason}
            for c, echo in zip(choices, echoes)]
    if plan.params[0].logprobs is not None:
        for row, choice in zip(rows, choices):
            row["logprobs"] = _logprobs(service, (choice.prompt_logprobs or []) + choice.logprobs, chat, 0)
    if plan.tool_choice is not None:
        for row in rows:
            content, calls = _read_calls(plan.tool_choice, row["text"])
            if calls:
                row.update(text=content, tool_calls=tool_calls.call_dicts(calls),
                           finish_reason="tool_calls" if row["finish_reason"] == "stop" else row["finish_reason"])
    generated = sum(len(c.token_ids) for c in choices)
    build = api.chat_response if chat else api.completion_response
    return build(api.new_id("chatcmpl" if chat else "cmpl"), service.name, rows, plan.prompt_tokens, generated)


async def open_stream(service: ModelService, plan: Submission) -> list:
    """Submit before the response starts, so refusals (429, 400) are still HTTP statuses."""
    return await service.start(plan.prompts, plan.params, plan.prompt_param)


async def chunks(service: ModelService, plan: Submission, streams: list, chat: bool,
                 include_usage: bool) -> AsyncIterator[dict]:
    """The chunks of a streamed response, in OpenAI's shape (``[DONE]`` is the caller's)."""
    rid, created = api.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    if chat:
        for index in range(len(streams)):
            yield api.chat_chunk(rid, service.name, created, index, {"role": "assistant", "content": ""}, None)
    generated, offsets = 0, [0] * len(streams)  # completions: each choice's text_offset so far
    echoed = [plan.echoes is None] * len(streams)
    calls = [ToolStream(plan.tool_choice) for _ in streams] if chat and plan.tool_choice is not None else None
    try:
        async with aclosing(service.stream(streams, plan.stops)) as pieces:
            async for piece in pieces:
                generated += len(piece.token_ids)
                if not echoed[piece.index]:  # echo: the prompt's text (and logprobs) first, once it is computed
                    echoed[piece.index] = True
                    scores = _logprobs(service, piece.prompt_logprobs, chat, 0) if piece.prompt_logprobs else None
                    offsets[piece.index] = sum(map(len, scores["tokens"])) if scores else 0
                    yield api.completion_chunk(rid, service.name, created, piece.index, plan.echoes[piece.index],
                                               None, scores)
                scores = None
                if piece.logprobs:
                    scores = _logprobs(service, piece.logprobs, chat, offsets[piece.index])
                    offsets[piece.index] += 0 if chat else sum(map(len, scores["tokens"]))
                if calls is not None:  # the text goes through the tool-call reader first
                    for delta, finish_reason in calls[piece.index].feed(piece.text, piece.finish_reason):
                        yield api.chat_chunk(rid, service.name, created, piece.index, delta, finish_reason, scores)
                        scores = None
                    if scores:
                        yield api.chat_chunk(rid, service.name, created, piece.index, {}, None, scores)
                elif piece.text or piece.finish_reason is not None or scores:
                    yield _chunk(service, rid, created, piece, chat, scores)
    finally:
        service.abort(streams)  # the client went away: free the KV-cache slots now
    if include_usage:
        obj = "chat.completion.chunk" if chat else "text_completion"
        yield api.usage_chunk(rid, service.name, created, obj, plan.prompt_tokens, generated)


class ToolStream:
    """One streamed choice of a request with tools: content is sent as it comes, until a
    call block may start (``auto``; nothing at all for ``required`` / named); the calls
    are sent whole, as one ``tool_calls`` delta, once the choice is done."""

    def __init__(self, choice):
        self.choice, self.text, self.sent = choice, "", 0

    def feed(self, text: str, finish_reason: str | None) -> list[tuple[dict, str | None]]:
        """(delta, finish_reason) chunks for this piece."""
        self.text += text
        out = []
        if self.choice == "auto":
            safe = self.text.find(tool_calls.OPEN)
            safe = len(self.text) - tool_calls.held_back(self.text) if safe < 0 else safe
            if safe > self.sent:
                out.append(({"content": self.text[self.sent:safe]}, None))
                self.sent = safe
        if finish_reason is None:
            return out
        content, calls = _read_calls(self.choice, self.text)
        if not calls:
            rest = self.text[self.sent:]
            return out + ([({"content": rest}, None)] if rest else []) + [({}, finish_reason)]
        rest = tool_calls.without_blocks(self.text[self.sent:]) if self.choice == "auto" else ""
        deltas = [{"index": i, **call} for i, call in enumerate(tool_calls.call_dicts(calls))]
        out += ([({"content": rest}, None)] if rest else []) + [({"tool_calls": deltas}, None)]
        return out + [({}, "tool_calls" if finish_reason == "stop" else finish_reason)]


def _read_calls(choice, text: str) -> tuple[str | None, list]:
    """(content, calls) of an output, for ``tool_choice`` ``choice``."""
    if choice == "auto":
        return tool_calls.PARSERS["hermes"](text)
    calls = tool_calls.forced_calls(text, choice)
    return (None, calls) if calls else (text, [])


def _chunk(service: ModelService, rid: str, created: int, piece: Piece, chat: bool, scores: dict | None) -> dict:
    if not chat:
        return api.completion_chunk(rid, service.name, created, piece.index, piece.text, piece.finish_reason, scores)
    delta = {"content": piece.text} if piece.text else {}
    return api.chat_chunk(rid, service.name, created, piece.index, delta, piece.finish_reason, scores)


def _logprobs(service: ModelService, entries: list, chat: bool, offset: int) -> dict:
    """The OpenAI ``logprobs`` object of ``entries`` (``deploy/logprobs.py``)."""
    text_of = service.encoder.token_text
    return logprobs.chat_logprobs(entries, text_of) if chat else logprobs.completion_logprobs(entries, text_of, offset)
