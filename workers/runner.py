"""ModelRunner: one forward pass + sampling over a step's sequences.

The reference engine runs it with the experts in-process; the FrontEnd actor runs it
with ``DispatchingExperts``. Everything else is the same code.
"""

from __future__ import annotations

import torch

from workers.model.attention import cache_shapes
from workers.model.batch import ForwardBatch
from workers.model.decoder import ExpertExecutor, MoEForCausalLM
from workers.model.kv_cache import KVCache
from workers.sampling import SamplingParams, sample
from workers.step import StepInput
from workers.trace import TraceRecorder


class ModelRunner:
    """Holds the model, the KV cache (one slot per sequence) and each slot's sampler."""

    def __init__(self, model: MoEForCausalLM, max_seqs: int, device: torch.device | str = "cpu"):
        self.model, self.device = model, torch.device(device)
        self.config = model.config
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(cache_shapes(self.config), max_seqs, dtype, self.device)
        self.samplers: dict[int, tuple[SamplingParams, torch.Generator]] = {}
        self.recorder: TraceRecorder | None = None

    def record_trace(self, enabled: bool) -> None:
        self.recorder = TraceRecorder(self.config.moe_layer_ids, self.config.num_experts) if enabled else None

    @torch.inference_mode()
    def run(self, step: StepInput, experts: ExpertExecutor | None = None) -> tuple[list[int], torch.Tensor, int]:
        """Sampled tokens (one per sequence), last-token logits ``[B, V]`` (float32, CPU),
        and the number of tokens computed."""
        for s in step.seqs:
            if s.params is not None:  # admitted this step: a fresh sampler for its slot
                self.samplers[s.slot] = (s.params, s.params.generator())
        batch = ForwardBatch.build([s.tokens for s in step.seqs], [s.start for s in step.seqs],
                                   [s.slot for s in step.seqs]).to(self.device)
        self.cache.reserve(batch.max_len)
        observer = self.recorder.observer if self.recorder else None
        logits = self.model(batch, self.cache, experts=experts, on_route=observer).float().cpu()
        if self.recorder:
            self.recorder.end_step([step.seqs[i].seq_id for i in batch.seq_index.tolist()], batch.positions.cpu(),
                                   [s.params is not None for s in step.seqs for _ in s.tokens])
        samplers = [self.samplers[s.slot] for s in step.seqs]
        tokens = sample(logits, [p for p, _ in samplers], [g for _, g in samplers])
        return tokens, logits, batch.num_tokens
