"""Tool calls: what a chat request's ``tools`` and ``tool_choice`` ask the model for, and
the calls read back from its output.

- ``auto`` (the default with tools): the chat template renders the tools; the model may
  answer with text, calls, or both. Calls are parsed from the output by a parser for the
  model's format (``PARSERS``; Hermes / Qwen: ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`` blocks); text outside the blocks is the message's content. A block
  that is not a JSON object with a ``name`` stays text.
- ``required``: the output is guided (``workers/guided.py``) to a JSON array of one to
  ``MAX_CALLS`` ``{"name": <a tool's name>, "parameters": <its arguments>}``, each valid
  against its tool's schema by construction, as vLLM does (vLLM sets no upper bound);
- a named function: the output is guided to that function's arguments object.
- ``none``: the tools are not rendered and nothing is parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS = 8  # calls in one turn under tool_choice required: a model that repeats itself still stops
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text


def hermes(text: str) -> tuple[str | None, list[Call]]:
    """(content, calls) of a Hermes-format output."""
    calls, kept, last = [], [], 0
    for match in _BLOCK.finditer(text):
        try:
            value = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            continue
        arguments = value.get("arguments", value.get("parameters", {}))
        calls.append(Call(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


PARSERS = {"hermes": hermes}


def forced_guide(tools: list, choice) -> tuple[str, str] | None:
    """The structured-output guide of ``tool_choice`` ``required`` or a named function
    (``tools``: the request's ``Tool`` models), None for ``auto`` / ``none``."""
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "parameters": t.function.parameters or {"type": "object"}},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        return "json_schema", json.dumps({"type": "array", "minItems": 1, "maxItems": MAX_CALLS,
                                          "items": {"anyOf": items}})
    if choice is not None and not isinstance(choice, str):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return "json_schema", json.dumps(tool.function.parameters or {"type": "object"})
    return None


def forced_calls(text: str, choice) -> list[Call]:
    """The calls of a guided ``required`` / named output (empty if it was cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if choice == "required":
        return [Call(v["name"], json.dumps(v["parameters"])) for v in value]
    return [Call(choice.function.name, json.dumps(value))]


def call_dicts(calls: list[Call]) -> list[dict]:
    """OpenAI's ``tool_calls`` of a message."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def without_blocks(text: str) -> str:
    """``text`` with its call blocks taken out."""
    return _BLOCK.sub("", text).strip()


def held_back(text: str) -> int:
    """How many characters at the end of ``text`` could start a call block (streaming
    holds them back until the next piece says)."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
