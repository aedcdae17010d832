"""Incremental text of a streamed request: the pieces concatenate to the final text.

Each new token's text comes from an incremental decoder (``IncrementalDecoder``:
constant work per token, so a long stream does not re-decode its whole output at every
token) and is released once it can no longer change: a token that ends in the middle of
a UTF-8 character gives no text until a later one completes it, and a tail that could be
the start of a stop string waits too (the final text is cut before the first stop
string, ``raymoe.workers.engine.finish_text``). Only the unreleased tail is searched for
stop strings: released text never holds the start of one.
"""

from __future__ import annotations

from typing import Callable


class TextStream:
    """``push(token)`` -> new text to send now; ``finish(final_text)`` -> the rest.

    ``decode``: the text each new token completes (``IncrementalDecoder.push``), or
    None for a model without a tokenizer (no text)."""

    def __init__(self, decode: Callable[[int], str] | None, stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, stop
        self.token_ids: list[int] = []
        self._sent: list[str] = []
        self._held = ""  # decoded, not yet sent: a possible start of a stop string, or after one

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        if self.decode is None:
            return ""
        text = self._held + self.decode(token_id)
        safe = len(text)
        for stop in self.stop:
            at = text.find(stop)
            safe = min(safe, at if at >= 0 else len(text) - _partial_suffix(text, stop))
        piece, self._held = text[:safe], text[safe:]
        if piece:
            self._sent.append(piece)
        return piece

    @property
    def sent(self) -> str:
        """Everything sent so far."""
        return "".join(self._sent)

    def finish(self, final_text: str | None) -> str:
        """What remains of ``final_text`` after what was sent (the engine's final text)."""
        if final_text is None:
            return ""
        sent = self.sent
        if not final_text.startswith(sent):
            return ""
        self._sent, self._held = [final_text], ""
        return final_text[len(sent):]


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``stop``."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
