"""The single-process reference engine: prefill + decode with a KV cache, continuous
batching, sampling, stop conditions, routing traces. No Ray, no collectives.

The distributed runtime must reproduce its output token for token.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from raymoe.workers.engine import Engine
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.model.decoder import MoEForCausalLM
from raymoe.workers.runner import ModelRunner
from raymoe.workers.scheduler import Scheduler
from raymoe.workers.stats import RuntimeStats, StepStats
from raymoe.workers.step import StepInput, StepOutput
from raymoe.workers.tokenizer import Tokenizer, load_tokenizer


def eos_ids(model_eos: tuple[int, ...], tokenizer: Tokenizer | None, vocab_size: int) -> tuple[int, ...]:
    """End-of-sequence ids: config.json's, else the tokenizer's; ids outside the vocabulary dropped."""
    eos = model_eos or ((tokenizer.eos_token_id,) if tokenizer and tokenizer.eos_token_id is not None else ())
    return tuple(i for i in eos if i < vocab_size)


class ReferenceEngine(Engine):
    """Generates with one model on one process.

    ``max_seqs`` sequences decode together; more requests wait and join as others finish.
    """

    def __init__(self, model: MoEForCausalLM, tokenizer: Tokenizer | None = None, max_seqs: int = 16,
                 max_seq_len: int | None = None):
        config = model.config
        self.model = model
        self.max_seq_len = max_seq_len or min(config.max_position_embeddings, 4096)
        self.eos_token_ids = eos_ids(config.eos_token_ids, tokenizer, config.vocab_size)
        scheduler = Scheduler(max_seqs, self.max_seq_len, self.eos_token_ids,
                              tokenizer.decode if tokenizer else None, config.vocab_size)
        super().__init__(scheduler, tokenizer)
        self.runner = ModelRunner(model, max_seqs)
        self.stats = RuntimeStats()

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, moge_groups: int | None = None,
                        **kwargs) -> "ReferenceEngine":
        return cls(load_model(path, dtype, moge_groups), load_tokenizer(path), **kwargs)

    @property
    def recorder(self):
        return self.runner.recorder

    def record_trace(self, enabled: bool = True) -> None:
        self.runner.record_trace(enabled)

    def save_trace(self, path: str | Path) -> int:
        """Write the routing trace (docs/formats.md); returns the number of tokens in it."""
        self.recorder.save(path)
        return int(self.recorder.topk_ids.shape[0])

    def expert_loads(self):
        """Tokens per expert per MoE layer ``[L, E]`` since ``record_trace()``."""
        return self.recorder.loads()

    def _execute(self, step: StepInput) -> StepOutput:
        started = time.perf_counter()
        tokens, logits, num_tokens = self.runner.run(step)
        stats = StepStats(num_tokens, len(step.seqs), [])
        stats.seconds["attention"] = time.perf_counter() - started  # everything ran here
        self.stats.add(stats)
        return StepOutput(tokens, stats, logits)
