"""Chat messages -> prompt text, with the checkpoint's chat template or a documented fallback.

The template is the checkpoint's ``chat_template.jinja`` (the file current transformers
writes, which wins, as in transformers), else the ``chat_template`` of its
``tokenizer_config.json`` (a string, or a list of named templates: "default" or the first
is used). It is rendered the way transformers renders it: a sandboxed environment,
``trim_blocks``/``lstrip_blocks``, ``messages``, ``add_generation_prompt=True``,
``bos_token``, ``eos_token`` and a ``raise_exception`` function, plus a request's
``chat_template_kwargs`` (e.g. ``enable_thinking``), which may not replace those names.

A checkpoint without one gets ``FALLBACK_TEMPLATE``: one ``role: content`` line per
message, then ``assistant:`` for the model to continue (docs/serving.md).
"""

from __future__ import annotations

from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template cannot be compiled, or refuses these messages; carries its message and
    the request field at fault (``param``)."""

    def __init__(self, message: str, source: str, param: str = "messages"):
        self.source, self.param = source, param
        super().__init__(f"chat template ({source}): {message}")


def _raise_exception(message: str):
    raise TemplateError(message)


def _special(config: dict, name: str) -> str:
    token = config.get(name)
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


def checkpoint_template(config: dict) -> str | None:
    """The chat template of a tokenizer_config.json mapping, or None."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token", "raise_exception", "strftime_now", "tools")


class ChatRenderer:
    """Renders message lists with one compiled template. ``source`` says which:
    "checkpoint chat_template.jinja", "checkpoint tokenizer_config.json" or "fallback"."""

    def __init__(self, tokenizer_config: dict | None, tokenizer_adds_bos: bool = False,
                 template_file: str | None = None, override: tuple[str, str] | None = None):
        """``template_file``: the text of the checkpoint's chat_template.jinja, if any;
        ``override``: (text, source) of a template that replaces the checkpoint's
        (``raymoe serve --chat-template``)."""
        config = tokenizer_config or {}
        self.strip_bos = tokenizer_adds_bos
        template = template_file if template_file else checkpoint_template(config)
        self.source = ("checkpoint chat_template.jinja" if template_file else
                       "checkpoint tokenizer_config.json" if template else "fallback")
        if override is not None:
            template, self.source = override
        self.bos_token, self.eos_token = _special(config, "bos_token"), _special(config, "eos_token")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template or FALLBACK_TEMPLATE)
        except TemplateError as exc:
            raise ChatTemplateError(str(exc), self.source) from None

    def render(self, messages: list[dict], extra: dict | None = None, tools: list[dict] | None = None) -> str:
        """Messages (``role``, ``content`` text, optional ``name``, ``tool_calls``,
        ``tool_call_id``) -> prompt text. Where the tokenizer adds BOS itself, the
        template's own leading BOS text is dropped. ``extra``: more template variables (a
        request's ``chat_template_kwargs``); ``tools``: the request's tools, as HF
        templates take them (a template that does not use them renders without)."""
        extra = extra or {}
        taken = [k for k in extra if k in RESERVED]
        if taken:
            raise ChatTemplateError(f"chat_template_kwargs may not set '{taken[0]}' (the server sets {list(RESERVED)})",
                                    self.source, "chat_template_kwargs")
        try:
            text = self.template.render(**extra, messages=messages, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)
        except TemplateError as exc:
            raise ChatTemplateError(str(exc), self.source) from None
        if self.strip_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text
