"""The application's settings, read once at the edge (no Ray import, so bad arguments fail fast).

The Serve application builder's arguments (``ServeArgs``: ``args:`` in a Serve config
file, or ``raymoe serve``'s flags): the raymoe deployment YAML, the served model name, the
API key (``api_key``, else the environment variable named by ``api_key_env``, default
``RAYMOE_API_KEY``), each request's deadline (``request_timeout_s``) and how long a
stopping server lets the requests in flight finish (``drain_timeout_s``), and a chat
template that replaces the checkpoint's (``chat_template``: a Jinja file, or the template
text itself, as vLLM's ``--chat-template``); and ``model``, ``expert_ranks``, ``layout``,
``dtype``, ``address``, which override those fields of the YAML (``raymoe serve --model
DIR``), and vLLM's names for the batching fields (``max_num_seqs``, ``max_model_len``,
``max_num_batched_tokens``, ``block_size``, ``kv_cache_memory``, ``enable_prefix_caching``). Relative paths are looked up in the current directory, then in the repository root.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raymoe.cluster.config import DeploymentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


# builder argument (vLLM's name) -> the batching field it overrides
BATCHING_ARGS = {"max_num_seqs": "max_seqs", "max_model_len": "max_seq_len", "max_num_batched_tokens":
                 "max_num_batched_tokens", "block_size": "block_size", "kv_cache_memory": "kv_cache_memory",
                 "enable_prefix_caching": "prefix_caching"}


class ServeArgsError(ValueError):
    """A bad application argument; names it, its value and the fix."""

    def __init__(self, name: str, value: object, fix: str):
        self.name, self.value, self.fix = name, value, fix
        super().__init__(f"raymoe serve argument '{name}' = {value!r}: {fix}")


class ServeArgs(BaseModel):
    """The application builder's arguments (``args:`` in a Serve config file)."""

    model_config = ConfigDict(extra="forbid")
    config: str  # a raymoe deployment YAML (deploy/configs/*.yaml)
    model_name: str | None = None  # the name clients send as "model"; default: the model directory's name
    api_key: str | None = None  # prefer api_key_env: a key in a config file is readable by whoever reads it
    api_key_env: str = "RAYMOE_API_KEY"
    # seconds from a request's arrival to its last token; past it: aborted, 504
    request_timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    # seconds a stopping server lets the requests in flight finish before failing them (503)
    drain_timeout_s: float = Field(default=30.0, ge=0, le=3_600)
    # a Jinja chat template file, or the template itself; replaces the checkpoint's
    chat_template: str | None = None
    # overrides of the deployment YAML (``raymoe serve --model DIR --expert-ranks 2 ...``)
    model: str | None = None
    expert_ranks: int | None = Field(default=None, ge=1)
    layout: str | None = None
    dtype: str | None = None
    address: str | None = None
    # overrides of the YAML's batching section, by vLLM's names (docs/serving.md, "KV cache and scheduling")
    max_num_seqs: int | None = None  # batching.max_seqs
    max_model_len: int | None = None  # batching.max_seq_len
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    kv_cache_memory: int | str | None = None
    enable_prefix_caching: bool | None = None  # batching.prefix_caching
    # the replica's "raymoe" loggers and Ray Serve's own (its LoggingConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # a request field raymoe does not know: false (default): ignored with a warning, as vLLM; true: a 400
    strict_fields: bool = False


@dataclass(frozen=True)
class ServerSettings:
    config: DeploymentConfig
    model_name: str
    api_key: str | None = field(default=None, repr=False)
    request_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0
    chat_template: tuple[str, str] | None = None  # (its text, where it came from)
    log_level: str = "info"
    strict_fields: bool = False


def resolve_path(path: str, what: str) -> str:
    """A path as given, else relative to the current directory, else to the repository root."""
    for candidate in (Path(path), Path.cwd() / path, ROOT / path):
        if candidate.exists():
            return str(candidate.resolve())
    where = sorted({str(Path.cwd()), str(ROOT)})
    raise ServeArgsError(what, path, f"no such file or directory (looked in {' and '.join(where)})")


def settings_from_args(args: dict) -> ServerSettings:
    try:
        parsed = ServeArgs(**(args or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(map(str, first["loc"])) or "args"
        raise ServeArgsError(name, first.get("input"), f"{first['msg']}; known: {sorted(ServeArgs.model_fields)}") \
            from None
    config = load_config(resolve_path(parsed.config, "config"))
    overrides = {k: getattr(parsed, k) for k in ("expert_ranks", "layout", "dtype") if getattr(parsed, k) is not None}
    if parsed.address is not None:
        overrides["ray"] = dataclasses.replace(config.ray, address=parsed.address)
    batching = {field: getattr(parsed, arg) for arg, field in BATCHING_ARGS.items() if getattr(parsed, arg) is not None}
    if batching:
        overrides["batching"] = dataclasses.replace(config.batching, **batching)
    if overrides:
        config = config.replace(**overrides)  # validated again: a bad value names its field
    changes = {"model": resolve_path(parsed.model, "model") if parsed.model else
               resolve_path(config.model, "config: model")}
    if config.placement.plan:
        plan = resolve_path(config.placement.plan, "config: plan")
        changes["placement"] = dataclasses.replace(config.placement, plan=plan)
    config = config.replace(**changes)
    api_key = parsed.api_key or os.environ.get(parsed.api_key_env) or None
    return ServerSettings(config, parsed.model_name or Path(config.model).name, api_key, parsed.request_timeout_s,
                          parsed.drain_timeout_s, _chat_template(parsed.chat_template), parsed.log_level,
                          parsed.strict_fields)


def _chat_template(value: str | None) -> tuple[str, str] | None:
    """``chat_template`` as (text, source): a file's text, or the value itself when it is
    a template (holds ``{{`` or ``{%``); compiled here, so a broken one fails at start."""
    if value is None:
        return None
    from raymoe.deploy.chat import ChatRenderer, ChatTemplateError

    if "{{" in value or "{%" in value:
        text, source = value, "--chat-template (inline)"
    else:
        path = resolve_path(value, "chat_template")
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeArgsError("chat_template", value, f"cannot be read as a text file ({exc})") from None
        source = f"--chat-template {path}"
    try:
        ChatRenderer(None, template_file=text)
    except ChatTemplateError as exc:
        raise ServeArgsError("chat_template", value, f"does not compile as a Jinja template ({exc})") from None
    return text, source
