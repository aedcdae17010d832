"""Log-probabilities in OpenAI's response shapes (``workers/sampling.TokenLogprob`` in).

- completions (``logprobs: N``): ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``, one entry per token; each ``top_logprobs`` entry maps the text of the
  N most likely tokens, and of the sampled one (so up to N + 1 entries, as OpenAI
  documents), to their logprobs; ``text_offset`` is each token's character offset in the
  choice's text (for ``echo``, the prompt's text comes first);
- chat (``logprobs: true``, ``top_logprobs: N``): ``{"content": [{"token", "logprob",
  "bytes", "top_logprobs": [...N]}]}``.

A token's text is its own decoding (``Tokenizer.token_text``); a token that is only part
of a character decodes to U+FFFD there, as in vLLM, and its ``bytes`` are those of that
text. A logprob of -inf (a banned token among the top N) is written as -9999.0, since
JSON has no infinity (vLLM's choice).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from raymoe.workers.sampling import TokenLogprob

FLOOR = -9999.0


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def completion_logprobs(entries: list[TokenLogprob | None], text_of: Callable[[int], str], start: int = 0) -> dict:
    """The completions ``logprobs`` object of ``entries`` (one per token; None: the first
    prompt token under ``echo``, which has no logprob); offsets count from ``start``."""
    tokens, values, tops, offsets, offset = [], [], [], [], start
    for entry in entries:
        text = text_of(entry.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry.logprob is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_finite(entry.logprob))
        top = {text_of(t): _finite(v) for t, v in entry.top}
        top.setdefault(text, _finite(entry.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], text_of: Callable[[int], str]) -> dict:
    """The chat ``logprobs`` object of the generated tokens ``entries``."""

    def item(token: int, value: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": _finite(value), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                        for e in entries]}
