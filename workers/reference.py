"""The single-process reference engine: prefill + decode with a KV cache, continuous
batching, sampling, stop conditions, routing traces. No Ray, no collectives.

The distributed runtime must reproduce its output token for token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.model.attention import cache_shapes
from workers.model.batch import ForwardBatch
from workers.model.checkpoint import load_model
from workers.model.decoder import MoEForCausalLM
from workers.model.errors import CheckpointError
from workers.model.kv_cache import KVCache
from workers.sampling import SamplingParams, sample
from workers.scheduler import Request, Scheduler, Sequence
from workers.tokenizer import Tokenizer, load_tokenizer
from workers.trace import TraceRecorder


@dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    finish_reason: str


def finish_text(tokenizer: Tokenizer | None, seq: Sequence) -> str | None:
    """Decoded output, cut before the first stop string."""
    if tokenizer is None:
        return None
    text = tokenizer.decode(seq.output_ids)
    for stop in seq.request.params.stop:
        if stop in text:
            text = text[: text.index(stop)]
    return text


class ReferenceEngine:
    """Generates with one model on one process.

    ``max_seqs`` sequences decode together; more requests wait and join as others finish.
    """

    def __init__(self, model: MoEForCausalLM, tokenizer: Tokenizer | None = None, max_seqs: int = 16,
                 max_seq_len: int | None = None, recorder: TraceRecorder | None = None):
        self.model, self.tokenizer, self.recorder = model, tokenizer, recorder
        config = model.config
        self.max_seq_len = max_seq_len or min(config.max_position_embeddings, 4096)
        self.max_seqs = max_seqs
        eos = config.eos_token_ids or ((tokenizer.eos_token_id,) if tokenizer and tokenizer.eos_token_id is not None else ())
        self.eos_token_ids = tuple(i for i in eos if i < config.vocab_size)
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(cache_shapes(config), max_seqs, dtype)
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, moge_groups: int | None = None,
                        **kwargs) -> "ReferenceEngine":
        return cls(load_model(path, dtype, moge_groups), load_tokenizer(path), **kwargs)

    def new_scheduler(self) -> Scheduler:
        detokenize = self.tokenizer.decode if self.tokenizer else None
        return Scheduler(self.max_seqs, self.max_seq_len, self.eos_token_ids, detokenize, self.model.config.vocab_size)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> torch.Tensor:
        """One forward pass over the pending tokens of ``seqs``; logits ``[B, V]``."""
        pending = [s.pending for s in seqs]
        batch = ForwardBatch.build(pending, [s.cached for s in seqs], [s.slot for s in seqs])
        self.cache.reserve(batch.max_len)
        observer = self.recorder.observer if self.recorder else None
        logits = self.model(batch, self.cache, on_route=observer)
        if self.recorder:
            seq_ids = [int(s.request.request_id) if s.request.request_id.isdigit() else s.slot for s in seqs]
            self.recorder.end_step(
                [seq_ids[i] for i in batch.seq_index.tolist()], batch.positions,
                [len(s.output_ids) == 0 for s in seqs for _ in s.pending],
            )
        return logits

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Token-id prompts in, completions out (in prompt order)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        scheduler = self.new_scheduler()
        requests = [Request(str(next(self._ids)), list(p), sp) for p, sp in zip(prompts, params)]
        for request in requests:
            scheduler.add(request)
        done: dict[str, Completion] = {}
        while scheduler.has_work():
            seqs = scheduler.schedule()
            logits = self.step(seqs)
            tokens = sample(logits, [s.request.params for s in seqs], [s.generator for s in seqs])
            for seq in scheduler.commit(seqs, tokens):
                rid = seq.request.request_id
                done[rid] = Completion(rid, seq.request.prompt_ids, seq.output_ids,
                                       finish_text(self.tokenizer, seq), seq.finish_reason)
        return [done[r.request_id] for r in requests]

    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Text prompts in (needs the checkpoint's tokenizer), completions out."""
        if self.tokenizer is None:
            raise CheckpointError("tokenizer.json", "this model has no tokenizer",
                                  "add the model's tokenizer.json to its directory, or pass token ids")
        return self.generate_ids([self.tokenizer.encode(p) for p in prompts], params)
