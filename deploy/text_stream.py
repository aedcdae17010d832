"""Incremental text of a streamed request: the pieces concatenate to the final text.

Each new token re-decodes the request's output and releases the part that can no longer
change: text ending in an incomplete UTF-8 character (decoded as U+FFFD) waits for the
next token, and so does a tail that could be the start of a stop string (the final
text is cut before the first stop string, ``raymoe.workers.engine.finish_text``).
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    """``push(token)`` -> new text to send now; ``finish(final_text)`` -> the rest."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, stop
        self.token_ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        if self.decode is None:
            return ""
        text = self.decode(self.token_ids).rstrip(REPLACEMENT)
        safe = len(text)
        for stop in self.stop:
            at = text.find(stop)
            safe = min(safe, at if at >= 0 else len(text) - _partial_suffix(text, stop))
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):safe], text[:safe]
        return piece

    def finish(self, final_text: str | None) -> str:
        """What remains of ``final_text`` after what was sent (the engine's final text)."""
        if final_text is None:
            return ""
        rest = final_text[len(self.sent):] if final_text.startswith(self.sent) else ""
        self.sent = final_text if final_text.startswith(self.sent) else self.sent
        return rest


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``stop``."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
