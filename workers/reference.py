"""The single-process reference engine: prefill + decode with a KV cache, continuous
batching, sampling, stop conditions, routing traces. No Ray, no collectives.

The distributed runtime must reproduce its output token for token.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from raymoe.workers.engine import Engine
from raymoe.workers.generation_config import GenerationDefaults, load_generation_config
from raymoe.workers.guided import Guides
from raymoe.workers.model.attention import cache_shapes
from raymoe.workers.model.checkpoint import Checkpoint, load_model
from raymoe.workers.model.decoder import ExpertExecutor, MoEForCausalLM
from raymoe.workers.model.dtypes import DTYPES, checkpoint_dtype
from raymoe.workers.model.dtypes import resolve as resolve_dtype
from raymoe.workers.model.kv_cache import KVLayout, kv_layout
from raymoe.workers.model.quantized_experts import quantize_model_experts
from raymoe.workers.runner import ModelRunner
from raymoe.workers.scheduler import Scheduler
from raymoe.workers.stats import RuntimeStats
from raymoe.workers.step import StepInput, StepOutput
from raymoe.workers.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("raymoe")


def checkpoint_eos_ids(path: str | Path, config) -> tuple[int, ...]:
    """``eos_ids`` of a checkpoint directory, as an engine over it uses them."""
    return eos_ids(config.eos_token_ids, load_tokenizer(path), config.vocab_size,
                   load_generation_config(path).eos_token_ids)


def eos_ids(model_eos: tuple[int, ...], tokenizer: Tokenizer | None, vocab_size: int,
            generation_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    """End-of-sequence ids: config.json's, else the tokenizer's, then generation_config.json's
    (``workers/generation_config.py``); ids outside the vocabulary dropped."""
    eos = model_eos or ((tokenizer.eos_token_id,) if tokenizer and tokenizer.eos_token_id is not None else ())
    eos = tuple(dict.fromkeys(eos + tuple(generation_eos)))
    return tuple(i for i in eos if i < vocab_size)


class LocalExecutor:
    """The whole model in this process: ``ModelRunner`` with the routed experts run here
    (or by ``experts()``, a fresh ``ExpertExecutor`` per step: the baselines' hook)."""

    def __init__(self, model: MoEForCausalLM, max_seqs: int, kv: KVLayout,
                 experts: Callable[[], ExpertExecutor] | None = None, cuda_graphs: bool = False,
                 guides: Guides | None = None):
        self.runner = ModelRunner(model, max_seqs, kv, next(model.parameters()).device, cuda_graphs, guides)
        self.experts = experts
        self.stats = RuntimeStats()
        self.steps: list[tuple[ExpertExecutor | None, float, int]] = []  # (experts, seconds, tokens) per step

    def execute(self, step: StepInput) -> StepOutput:
        experts = self.experts() if self.experts else None
        started = time.perf_counter()
        out = self.runner.run(step, experts)
        seconds = time.perf_counter() - started
        out.stats.seconds["attention"] = seconds  # everything ran here
        self.stats.add(out.stats)
        if self.experts:
            self.steps.append((experts, seconds, out.stats.tokens))
        return out


class ReferenceEngine(Engine):
    """Generates with one model on one process.

    ``max_seqs`` sequences run together, their KV-cache blocks permitting; more requests
    wait and join as others finish. The KV cache and the scheduling options are a
    deployment's ``batching`` section (docs/serving.md): ``kv_cache_memory`` (bytes;
    None: room for 16 sequences of ``max_seq_len``), ``block_size``,
    ``max_num_batched_tokens`` (None: no chunked prefill) and ``prefix_caching``.
    ``cuda_graphs``: decode steps replay CUDA graphs captured per batch-size bucket
    (``workers/model/static_decode.py``; the model must be on a CUDA device; not yet
    measured on a GPU).
    """

    def __init__(self, model: MoEForCausalLM, tokenizer: Tokenizer | None = None, max_seqs: int = 16,
                 max_seq_len: int | None = None, experts: Callable[[], ExpertExecutor] | None = None,
                 cuda_graphs: bool = False, generation: GenerationDefaults | None = None,
                 kv_cache_memory: int | None = None, block_size: int = 16,
                 max_num_batched_tokens: int | None = 2048, prefix_caching: bool = True):
        config = model.config
        self.model = model
        self.max_seq_len = max_seq_len or min(config.max_position_embeddings, 4096)
        self.generation = generation or GenerationDefaults()
        self.eos_token_ids = eos_ids(config.eos_token_ids, tokenizer, config.vocab_size,
                                     self.generation.eos_token_ids)
        kv = kv_layout(cache_shapes(config), next(model.parameters()).dtype, kv_cache_memory, self.max_seq_len,
                       block_size)
        scheduler = Scheduler(max_seqs, self.max_seq_len, self.eos_token_ids, tokenizer, config.vocab_size, kv,
                              max_num_batched_tokens, prefix_caching)
        guides = Guides(tokenizer.json_text, config.vocab_size, self.eos_token_ids) if tokenizer else None
        super().__init__(LocalExecutor(model, max_seqs, kv, experts, cuda_graphs, guides), scheduler, tokenizer)

    @property
    def runner(self) -> ModelRunner:
        return self.executor.runner

    @property
    def stats(self) -> RuntimeStats:
        return self.executor.stats

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = "auto", moge_groups: int | None = None,
                        expert_quantization: tuple[str, int] = ("none", 32), **kwargs) -> "ReferenceEngine":
        """The engine over a checkpoint directory, on the CPU. ``dtype``: a torch dtype, or a
        name of ``workers/model/dtypes.py`` (``auto``: what the checkpoint declares, as
        that module resolves it on a CPU: float32). ``expert_quantization``: ``(mode,
        group_size)`` of the routed experts (``workers/model/quantized_experts.py``), as a
        deployment's ``quantization`` section."""
        ckpt = Checkpoint(path, moge_groups)
        if isinstance(dtype, str):
            name, why = resolve_dtype(dtype, checkpoint_dtype(ckpt.raw_config), on_gpu=False)
            log.info("reference engine: dtype %s (%s)", name, why)
            dtype = DTYPES[name]
        kwargs.setdefault("generation", load_generation_config(path))
        model = quantize_model_experts(load_model(path, dtype, moge_groups, checkpoint=ckpt), *expert_quantization)
        return cls(model, load_tokenizer(path), **kwargs)

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
