"""The checkpoint's ``generation_config.json``: its end-of-sequence ids and its
recommended sampling defaults, applied as vLLM applies them.

- ``eos_token_id`` (an id or a list) joins config.json's end-of-sequence ids: a request
  stops at any of them (unless it sets ``ignore_eos``). Instruct checkpoints list their
  end-of-turn token here (e.g. ``<|im_end|>`` besides ``<|endoftext|>``).
- ``temperature``, ``top_p`` and ``top_k`` become the defaults of requests that leave
  the field out; a request that sets one overrides it. Fields the file does not set keep
  the API's own defaults; ``do_sample`` is not read (vLLM does not either).

A file that is not a JSON object is a ``CheckpointError``; a bad field is a
``ConfigFieldError`` naming it (the ids are read as config.json's are, ``RawConfig``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raymoe.workers.model.errors import CheckpointError, ConfigFieldError
from raymoe.workers.model.families.raw_config import RawConfig

FILE = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    source: str | None = None  # the file they came from; None: the checkpoint has none

    def sampling(self) -> dict:
        """The sampling defaults the file sets, by API field name."""
        return {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k))
                if v is not None}


def load_generation_config(path: str | Path) -> GenerationDefaults:
    """``path/generation_config.json``, or empty defaults when the checkpoint has none."""
    file = Path(path) / FILE
    if not file.is_file():
        return GenerationDefaults()
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(file, f"is not valid JSON ({exc})", "restore the file or delete it") from None
    if not isinstance(data, dict):
        raise CheckpointError(file, "is not a JSON object", "restore the file or delete it")

    def bad(field: str, expected: str):
        return ConfigFieldError(file, field, data[field], expected)

    ids = RawConfig(data, str(file)).eos_token_ids()
    temperature, top_p, top_k = data.get("temperature"), data.get("top_p"), data.get("top_k")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise bad("temperature", "a number in [0, 2]")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise bad("top_p", "a number in (0, 1]")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1):
        raise bad("top_k", "an integer >= -1 (0 or -1: off)")
    return GenerationDefaults(
        tuple(ids), None if temperature is None else float(temperature), None if top_p is None else float(top_p),
        None if top_k is None or top_k <= 0 else top_k, str(file))
