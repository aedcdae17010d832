"""The request loop shared by the reference engine and the distributed deployment:
queue requests, schedule a step, have the executor run it, commit the sampled tokens.

``Engine(executor, scheduler, tokenizer)``: the executor runs one forward pass +
sampling (``LocalExecutor``: the model in this process; ``RayExecutor`` in
``raymoe.cluster``: actors on Ray). When an executor recovers from a failure it raises
``Replay``: the engine has the scheduler forget the sequences' KV caches and runs the
step again from their committed tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import torch

from raymoe.workers.model.errors import CheckpointError
from raymoe.workers.sampling import History, SamplingParams, TokenLogprob
from raymoe.workers.scheduler import Request, Scheduler, Sequence
from raymoe.workers.step import SeqStep, StepInput, StepOutput
from raymoe.workers.tokenizer import Tokenizer


@dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None  # one per output token, when the params ask
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token (the first's logprob None), when asked


@dataclass
class StepResult:
    """What one step produced: the token each running request got (by request id), the
    requests that finished, (when asked for) each request's logits ``[V]``, and the
    sampled tokens' logprobs of the requests whose params ask."""

    tokens: dict[str, int]
    finished: list[Completion]
    logits: dict[str, torch.Tensor]
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # with each one's first token


class QueueFullError(RuntimeError):
    """More requests are waiting than the engine's queue limit allows. ``retry_after_s``:
    whole seconds until a slot is expected to be free, when the caller estimated it."""

    def __init__(self, waiting: int, limit: int, retry_after_s: int | None = None):
        self.waiting, self.limit, self.retry_after_s = waiting, limit, retry_after_s
        super().__init__(f"{waiting} requests are waiting (queue limit {limit}); retry later")


class Replay(Exception):
    """Raised by an executor that recovered from a failed step: every running sequence's
    KV cache is gone; run the step again with each re-prefilling its committed tokens.
    Sampling is stateless per (seed, token index), so the replay samples what the failed
    step would have."""


class Executor(Protocol):
    """Runs steps: one forward pass over the step's sequences and one sampled token each."""

    def execute(self, step: StepInput) -> StepOutput: ...


def finish_text(tokenizer: Tokenizer | None, seq: Sequence) -> str | None:
    """Decoded output, cut before the first stop string."""
    if tokenizer is None:
        return None
    text = tokenizer.decode(seq.output_ids)
    for stop in seq.request.params.stop:
        if stop in text:
            text = text[: text.index(stop)]
    return text


def _prompt_scores(seq: Sequence) -> tuple[int, tuple[int, ...]]:
    """``SeqStep.prompt_scores`` of this step: the rows (positions ``i``) of its chunk that
    score prompt token ``i + 1`` and have not yet (a replay or a recomputation after
    preemption scores nothing twice)."""
    if seq.request.params.prompt_logprobs is None:
        return 0, ()
    prompt = seq.request.prompt_ids
    first = max(seq.cached, len(seq.prompt_logprobs))
    last = min(seq.step_end, len(prompt) - 1)
    return (first - seq.cached, tuple(prompt[first + 1 : last + 1])) if last > first else (0, ())


def prompt_logprobs(seq: Sequence) -> list[TokenLogprob]:
    """One entry per prompt token: the first has no logprob, the others what was scored."""
    return [TokenLogprob(seq.request.prompt_ids[0], None), *seq.prompt_logprobs]


class Engine:
    """Requests in, completions out, over any ``Executor``."""

    def __init__(self, executor: Executor, scheduler: Scheduler, tokenizer: Tokenizer | None,
                 max_queue: int | None = None):
        self.executor = executor
        self.scheduler, self.tokenizer, self.max_queue = scheduler, tokenizer, max_queue
        self._step_ids = itertools.count()
        self._seq_ids = itertools.count()
        self._seq_of: dict[str, int] = {}  # request id -> integer sequence id (traces)

    def _execute(self, seqs: list[Sequence], return_logits: bool) -> StepOutput:
        """Run one step; after a recovery (``Replay``) run it again from the committed tokens
        (the executor decides how often it recovers before it gives up)."""
        step = StepInput(next(self._step_ids), [self._seq_step(s) for s in seqs], return_logits)
        while True:
            try:
                return self.executor.execute(step)
            except Replay:
                self.scheduler.forget_kv()
                step = StepInput(step.step_id, [self._seq_step(s) for s in seqs], return_logits)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; it joins the batch at the next step. Bad requests raise here."""
        waiting = len(self.scheduler.waiting)
        if self.max_queue is not None and waiting >= self.max_queue:
            raise QueueFullError(waiting, self.max_queue)
        seq_id = next(self._seq_ids)
        request_id = request_id if request_id is not None else str(seq_id)
        self.scheduler.add(Request(request_id, list(prompt_ids), params.with_seed()))
        self._seq_of[request_id] = seq_id
        return request_id

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> bool:
        """Cancel a request (e.g. its client went away); frees its KV-cache blocks."""
        found = any(s.request.request_id == request_id for s in (*self.scheduler.waiting, *self.scheduler.running))
        self.scheduler.abort(request_id)
        self._seq_of.pop(request_id, None)
        return found

    def step(self, return_logits: bool = False) -> StepResult:
        """Run one step over the sequences the scheduler picks; the result names those
        that sampled a token (a prompt chunk that ends before its prompt does samples none)."""
        seqs = self.scheduler.schedule()
        if not seqs:
            return StepResult({}, [], {})
        out = self._execute(seqs, return_logits)
        sampled = [i for i, s in enumerate(seqs) if s.samples]
        ids = {i: seqs[i].request.request_id for i in sampled}
        logits = {rid: out.logits[i] for i, rid in ids.items()} if return_logits else {}
        for b, entries in (out.prompt_logprobs or {}).items():
            seqs[b].prompt_logprobs.extend(entries)
        prompts = {rid: prompt_logprobs(seqs[i]) for i, rid in ids.items()
                   if not seqs[i].output_ids and seqs[i].request.params.prompt_logprobs is not None}
        scores = {}
        for i, rid in ids.items():
            entry = out.logprobs[i] if out.logprobs is not None else None
            if entry is not None:
                scores[rid] = entry
                seqs[i].logprobs.append(entry)
        finished = [self._completion(s) for s in self.scheduler.commit(seqs, out.tokens)]
        return StepResult({rid: out.tokens[i] for i, rid in ids.items()}, finished, logits, scores, prompts)

    def _seq_step(self, seq: Sequence) -> SeqStep:
        p = seq.request.params
        history = History()
        if not p.plain:
            banned = tuple(sorted({*self.scheduler.eos_token_ids, *p.stop_token_ids})) \
                if len(seq.output_ids) < p.min_tokens else ()
            history = History(banned, tuple(seq.request.prompt_ids) if p.repetition_penalty != 1.0 else (),
                              tuple(seq.output_ids) if p.penalized or p.guide else ())
        return SeqStep(self._seq_of[seq.request.request_id], seq.slot, seq.pending, seq.cached,
                       len(seq.output_ids), p, history, tuple(seq.blocks), _prompt_scores(seq))

    def _completion(self, seq: Sequence) -> Completion:
        self._seq_of.pop(seq.request.request_id, None)
        return Completion(seq.request.request_id, seq.request.prompt_ids, seq.output_ids,
                          finish_text(self.tokenizer, seq), seq.finish_reason,
                          seq.logprobs if seq.request.params.logprobs is not None else None,
                          prompt_logprobs(seq) if seq.request.params.prompt_logprobs is not None else None)

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Token-id prompts in, completions out (in prompt order)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, Completion] = {}
        while self.has_work():
            for completion in self.step().finished:
                done[completion.request_id] = completion
        return [done[i] for i in ids]

    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Text prompts in (needs the checkpoint's tokenizer), completions out."""
        if self.tokenizer is None:
            raise CheckpointError("tokenizer.json", "this model has no tokenizer",
                                  "add the model's tokenizer.json to its directory, or pass token ids")
        return self.generate_ids([self.tokenizer.encode(p) for p in prompts], params)
