"""Continuous batching: requests join between steps and leave when they finish.

Pure bookkeeping (no model): the reference engine and the distributed coordinator
both drive a ``Scheduler`` and differ only in how they run a step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raymoe.workers.sampling import SamplingParams

if TYPE_CHECKING:
    from raymoe.workers.tokenizer import IncrementalDecoder, Tokenizer


class RequestError(ValueError):
    """A request cannot be served as given; names the field, the value and the limit."""

    def __init__(self, field_name: str, value: object, expected: str):
        self.field, self.value, self.expected = field_name, value, expected
        super().__init__(f"request field '{field_name}' = {value!r}; expected {expected}")


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Sequence:
    """A running request. Its KV cache holds the first ``cached`` of ``all_ids``."""

    request: Request
    slot: int
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # Stop strings: the output decoded a token at a time, and its last characters that
    # a stop string ending in the next token's text could start in.
    decoder: "IncrementalDecoder | None" = None
    stop_tail: str = ""

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def pending(self) -> list[int]:
        """Tokens to feed this step: the whole prompt first, then the last sampled token."""
        return self.all_ids[self.cached :]


class Scheduler:
    """Admits up to ``max_seqs`` sequences (one KV slot each), up to ``max_seq_len`` tokens each."""

    def __init__(self, max_seqs: int, max_seq_len: int, eos_token_ids: tuple[int, ...] = (),
                 tokenizer: "Tokenizer | None" = None, vocab_size: int | None = None):
        """``tokenizer``: decodes the outputs of requests with stop strings (None: such
        requests are refused)."""
        self.max_seqs, self.max_seq_len = max_seqs, max_seq_len
        self.eos_token_ids = set(eos_token_ids)
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_seqs - 1, -1, -1))

    def add(self, request: Request) -> None:
        prompt = request.prompt_ids
        if not prompt:
            raise RequestError("prompt", prompt, "at least one token")
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < self.vocab_size)
            raise RequestError("prompt", bad, f"token ids in [0, {self.vocab_size})")
        if len(prompt) + 1 > self.max_seq_len:
            raise RequestError("prompt", f"{len(prompt)} tokens", f"at most {self.max_seq_len - 1} tokens")
        if request.params.stop and self.tokenizer is None:
            raise RequestError("stop", request.params.stop, "no stop strings: the model has no tokenizer")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """Admit waiting requests into free slots; return every running sequence."""
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            decoder = self.tokenizer.incremental() if request.params.stop else None
            self.running.append(Sequence(request, self.free_slots.pop(), decoder=decoder))
        return list(self.running)

    def commit(self, seqs: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """Record one sampled token per sequence of the step; return those that finished."""
        finished = []
        for seq, token in zip(seqs, tokens):
            seq.cached = len(seq.all_ids)
            seq.output_ids.append(token)
            seq.finish_reason = self._finish_reason(seq, token)
            if seq.finish_reason:
                finished.append(seq)
        for seq in finished:
            self.release(seq)
        return finished

    def release(self, seq: Sequence, reason: str | None = None) -> None:
        """Free a sequence's slot (finished, or aborted with ``reason``)."""
        if reason:
            seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)

    def forget_kv(self, seqs: list[Sequence] | None = None) -> None:
        """The KV caches of ``seqs`` (default: every running sequence) are gone (an actor
        was replaced, a plan change failed): each re-prefills its committed tokens, the
        prompt and what it sampled so far, at its next step."""
        for seq in self.running if seqs is None else seqs:
            seq.cached = 0

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request, waiting or running (its slot is freed); the aborted running
        sequence, if there was one."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return None
        for seq in self.running:
            if seq.request.request_id == request_id:
                self.release(seq, "abort")
                return seq
        return None

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.request.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop and _stop_string_ends_here(seq, token, p.stop) and len(seq.output_ids) >= p.min_tokens:
            return "stop"  # (the search runs under min_tokens too: it keeps the decoder's state)
        if len(seq.output_ids) >= p.max_new_tokens or len(seq.all_ids) >= self.max_seq_len:
            return "length"
        return None


def _stop_string_ends_here(seq: Sequence, token: int, stops: tuple[str, ...]) -> bool:
    """Does the output's text, now that ``token`` joined it, hold a stop string? The text
    before held none, so a stop string found now ends in this token's text (or in the
    characters the decoder still holds) and starts at most ``len(stop) - 1`` characters
    before it: ``stop_tail`` keeps that many, and the search costs the same at every token."""
    window = seq.stop_tail + seq.decoder.push(token)
    if any(stop in window + seq.decoder.held() for stop in stops):
        return True
    keep = max(map(len, stops)) - 1
    seq.stop_tail = window[-keep:] if keep else ""
    return False
