"""Continuous batching over a paged KV cache: requests join between steps and leave when
they finish; KV-cache blocks are handed out as sequences grow (``workers/block_pool.py``).

Pure bookkeeping (no model): the reference engine and the distributed coordinator
both drive a ``Scheduler`` and differ only in how they run a step.

Each step (``schedule``):

1. running sequences that decode (one new token) come first, then running sequences
   still prefilling, oldest first; each feeds at most what is left of the step's token
   budget (``max_num_batched_tokens``), so a long prompt is prefilled in chunks over
   several steps beside the decodes (chunked prefill); a chunk that ends before the
   prompt does samples nothing;
2. a sequence that needs a block when none is free preempts the youngest running
   sequence not yet in the step (its blocks go back; it waits at the head of the queue
   and is recomputed from its prompt and what it generated), or itself when no other is
   left;
3. waiting requests join, in order, while a block-table row (``max_seqs``), blocks for
   their first chunk and token budget are left, and no sequence was preempted this step.
   With prefix caching a joining sequence first takes the cached blocks that hold its
   leading full blocks of tokens and skips their prefill.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raymoe.workers.block_pool import BlockPool
from raymoe.workers.model.kv_cache import KVLayout
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
    """A request, waiting or running. Its KV cache holds the first ``cached`` of ``all_ids``
    in ``blocks``; this step feeds ``all_ids[cached:step_end]``."""

    request: Request
    slot: int = -1  # its block-table row while it runs
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # Stop strings: the output decoded a token at a time, and its last characters that
    # a stop string ending in the next token's text could start in.
    decoder: "IncrementalDecoder | None" = None
    stop_tail: str = ""
    blocks: list[int] = field(default_factory=list)
    step_end: int = 0
    keyed: int = 0  # leading blocks found in or registered with the prefix cache
    parent: int = -1  # the serial of the last keyed block's key (workers/block_pool.py)
    admitted: int = -1  # admission order (the youngest is preempted first)
    logprobs: list = field(default_factory=list)  # a TokenLogprob per output token, when the params ask
    prompt_logprobs: list = field(default_factory=list)  # for prompt positions 1, 2, ... (echo), so far

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> list[int]:
        """Tokens to feed this step: a chunk of the prompt, or the last sampled token."""
        return self.all_ids[self.cached : self.step_end]

    @property
    def samples(self) -> bool:
        """This step reaches the end of its tokens, so the token it samples is kept."""
        return self.step_end == self.num_tokens


@dataclass
class SchedulerStats:
    """Counts since start (``preemptions``, prefix-cache ``queried`` / ``hit`` tokens of
    joining sequences) and the last step's ``prefill`` / ``decode`` tokens."""

    preemptions: int = 0
    queried: int = 0
    hit: int = 0
    prefill: int = 0
    decode: int = 0


class Scheduler:
    """Runs up to ``max_seqs`` sequences of up to ``max_seq_len`` tokens each over the
    block pool of ``kv`` (default: enough blocks for ``max_seqs`` full-length sequences).
    ``max_num_batched_tokens``: tokens per step (None: no limit, no chunking)."""

    def __init__(self, max_seqs: int, max_seq_len: int, eos_token_ids: tuple[int, ...] = (),
                 tokenizer: "Tokenizer | None" = None, vocab_size: int | None = None,
                 kv: KVLayout | None = None, max_num_batched_tokens: int | None = None,
                 prefix_caching: bool = True):
        """``tokenizer``: decodes the outputs of requests with stop strings (None: such
        requests are refused)."""
        self.kv = kv or KVLayout.for_sequences(max_seqs, max_seq_len)
        if min(self.kv.capacity, self.kv.tokens) < max_seq_len:
            raise ValueError(f"a KV pool of {self.kv.num_blocks} blocks of {self.kv.block_size} tokens (at most "
                             f"{self.kv.max_blocks} per sequence) cannot hold a sequence of {max_seq_len} tokens")
        if max_num_batched_tokens is not None and max_num_batched_tokens < max_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_seqs ({max_seqs}): "
                             "every running sequence's decode must fit one step")
        self.max_seqs, self.max_seq_len = max_seqs, max_seq_len
        self.max_num_batched_tokens, self.prefix_caching = max_num_batched_tokens, prefix_caching
        self.eos_token_ids = set(eos_token_ids)
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.pool = BlockPool(self.kv.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        self.stats = SchedulerStats()
        self._admissions = 0

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
        if request.params.guide and self.tokenizer is None:
            raise RequestError("guide", request.params.guide[0], "no structured output: the model has no tokenizer")
        decoder = self.tokenizer.incremental() if request.params.stop else None
        self.waiting.append(Sequence(request, decoder=decoder))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step, each with its ``step_end`` set (see the module text)."""
        budget = self.max_num_batched_tokens or math.inf
        scheduled: list[Sequence] = []
        preempted = self.stats.preemptions
        decoding = [s for s in self.running if s.num_tokens - s.cached == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.cached > 1]
        for seq in decoding + prefilling:
            if budget < 1:
                break
            if seq.slot < 0:  # preempted by one before it in this loop
                continue
            end = seq.cached + min(seq.num_tokens - seq.cached, budget)
            if self._grow(seq, end, scheduled):
                seq.step_end, budget = end, budget - (end - seq.cached)
                scheduled.append(seq)
        while self.waiting and self.free_slots and budget >= 1 and self.stats.preemptions == preempted:
            seq = self.waiting[0]
            self._take_prefix(seq)
            end = seq.cached + min(seq.num_tokens - seq.cached, budget)
            if not self._grow(seq, end, None):
                self._free_blocks(seq)
                break
            self.waiting.popleft()
            seq.slot, seq.admitted = self.free_slots.pop(), self._admissions
            self._admissions += 1
            self.running.append(seq)
            self.stats.queried += seq.num_tokens
            self.stats.hit += seq.cached
            seq.step_end, budget = end, budget - (end - seq.cached)
            scheduled.append(seq)
        self.stats.decode = sum(1 for s in scheduled if s.step_end - s.cached == 1 and s.samples)
        self.stats.prefill = sum(s.step_end - s.cached for s in scheduled) - self.stats.decode
        return scheduled

    def _grow(self, seq: Sequence, end: int, scheduled: list[Sequence] | None) -> bool:
        """Give ``seq`` the blocks for its first ``end`` tokens. When the pool is out, a
        running sequence preempts the youngest other one outside ``scheduled`` (or
        itself: False); a joining one (``scheduled`` None) preempts no one (False)."""
        need = math.ceil(end / self.kv.block_size) - len(seq.blocks)
        while need > 0:
            block = self.pool.allocate()
            if block is None:
                if scheduled is None:
                    return False
                victims = [s for s in self.running if s is not seq and s not in scheduled]
                victim = max(victims, key=lambda s: s.admitted) if victims else seq
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.blocks.append(block)
            need -= 1
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Stop ``seq``, give its blocks back, and queue it first to be recomputed."""
        self._stop(seq)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _take_prefix(self, seq: Sequence) -> None:
        """Hold the cached blocks of ``seq``'s leading full blocks (not its last token:
        that one must be computed to sample from) and skip their prefill."""
        if not self.prefix_caching or seq.blocks or seq.request.params.prompt_logprobs is not None:
            return  # (prompt logprobs need every prompt token computed)
        size, ids = self.kv.block_size, seq.all_ids
        for i in range((len(ids) - 1) // size):
            found = self.pool.lookup((seq.parent, tuple(ids[i * size : (i + 1) * size])))
            if found is None:
                break
            seq.blocks.append(found[0])
            seq.parent, seq.keyed = found[1], i + 1
        seq.cached = seq.keyed * size

    def _register(self, seq: Sequence) -> None:
        """Offer ``seq``'s newly completed full blocks to the prefix cache."""
        size = self.kv.block_size
        full = seq.cached // size
        if not self.prefix_caching or full <= seq.keyed:
            return
        ids = seq.all_ids
        for i in range(seq.keyed, full):
            seq.parent = self.pool.register(seq.blocks[i], (seq.parent, tuple(ids[i * size : (i + 1) * size])))
        seq.keyed = full

    def _free_blocks(self, seq: Sequence) -> None:
        for block in reversed(seq.blocks):  # the tail first: it is evicted before the prefix it extends
            self.pool.free(block)
        seq.blocks, seq.cached, seq.keyed, seq.parent = [], 0, 0, -1

    def _stop(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        seq.slot = -1
        self._free_blocks(seq)

    def commit(self, seqs: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """Record the step: its tokens are cached now, and each sequence that ``samples``
        takes its sampled token; return those that finished."""
        finished = []
        for seq, token in zip(seqs, tokens):
            sampled = seq.samples
            seq.cached = seq.step_end
            self._register(seq)
            if not sampled:
                continue
            seq.output_ids.append(token)
            seq.finish_reason = self._finish_reason(seq, token)
            if seq.finish_reason:
                finished.append(seq)
        for seq in finished:
            self.release(seq)
        return finished

    def release(self, seq: Sequence, reason: str | None = None) -> None:
        """Free a sequence's row and blocks (finished, or aborted with ``reason``)."""
        if reason:
            seq.finish_reason = reason
        if seq in self.running:
            self._stop(seq)

    def forget_kv(self) -> None:
        """The KV caches are gone (an actor was replaced, a plan change failed): every
        running sequence re-prefills its committed tokens, the prompt and what it sampled
        so far, into the blocks it holds; no cached prefix is trusted any more."""
        self.pool.clear_cache()
        for seq in self.running:
            seq.cached, seq.keyed, seq.parent = 0, 0, -1

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request, waiting or running (its blocks are freed); the aborted running
        sequence, if there was one."""
        for seq in self.waiting:
            if seq.request.request_id == request_id:
                self.waiting.remove(seq)
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
