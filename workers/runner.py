"""ModelRunner: one forward pass + sampling over a step's sequences.

The reference engine runs it with the experts in-process; the FrontEnd actor runs it
with ``DispatchingExperts``. Everything else is the same code.
"""

from __future__ import annotations

import torch

from raymoe.workers.guided import Guides, guide_masks
from raymoe.workers.model.attention import cache_shapes
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.decoder import ExpertExecutor, MoEForCausalLM
from raymoe.workers.model.kv_cache import KVCache, KVLayout
from raymoe.workers.model.static_decode import DecodeGraphs
from raymoe.workers.overlap import SplitExperts, two_batch_forward
from raymoe.workers.sampling import sample_and_score, score_prompt
from raymoe.workers.stats import StepStats
from raymoe.workers.step import StepInput, StepOutput
from raymoe.workers.trace import TraceRecorder


class ModelRunner:
    """Holds the model and the paged KV cache (``max_seqs`` block-table rows over the
    pool of ``layout``; a step's sequences bring their block tables).

    ``cuda_graphs``: replay decode steps from CUDA graphs (``workers/model/static_decode.py``)
    over the block tables' whole capacity, with one more row for padding; CUDA only, and
    only where the routed experts run in this process."""

    def __init__(self, model: MoEForCausalLM, max_seqs: int, layout: KVLayout, device: torch.device | str = "cpu",
                 cuda_graphs: bool = False, guides: Guides | None = None):
        self.model, self.device = model, torch.device(device)
        self.config = model.config
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(cache_shapes(self.config), max_seqs + int(cuda_graphs), layout, dtype, self.device)
        self.graphs = DecodeGraphs(model, self.cache, max_seqs) if cuda_graphs else None
        self.recorder: TraceRecorder | None = None
        self.guides = guides  # structured output's masks (None: the model has no tokenizer)

    def record_trace(self, enabled: bool) -> None:
        self.recorder = TraceRecorder(self.config.moe_layer_ids, self.config.num_experts) if enabled else None

    @torch.inference_mode()
    def run(self, step: StepInput, experts: ExpertExecutor | None = None) -> StepOutput:
        """Sampled tokens (one per sequence), their logprobs where asked, last-token logits
        ``[B, V]`` (float32, CPU) and the number of tokens computed (``stats.tokens``; the
        caller fills in the rest of the stats). A step with two ``micro_batches`` runs them
        interleaved (``workers/overlap.py``): ``experts`` must then be a ``SplitExperts``."""
        for s in step.seqs:
            self.cache.set_blocks(s.slot, s.blocks)
        prompt_logprobs = None
        if len(step.micro_batches) == 2:
            logits, computed = self._forward_two(step, experts)
        elif self.graphs is not None and experts is None and self.recorder is None and step.decode \
                and not step.prompt_scores:
            logits = self.graphs.run([s.tokens[0] for s in step.seqs], [s.start for s in step.seqs],
                                     [s.slot for s in step.seqs])
            computed = len(step.seqs)
        else:
            logits, computed, prompt_logprobs = self._forward(step, experts)
        logits = logits.float().cpu()
        tokens, scores = sample_and_score(logits, [s.params for s in step.seqs], [s.generated for s in step.seqs],
                                          [s.history for s in step.seqs], guide_masks(self.guides, step.seqs))
        return StepOutput(tokens, StepStats(computed, len(step.seqs), []), logits,
                          scores if any(x is not None for x in scores) else None, prompt_logprobs)

    def _batch(self, seqs) -> ForwardBatch:
        return ForwardBatch.build([s.tokens for s in seqs], [s.start for s in seqs],
                                  [s.slot for s in seqs]).to(self.device)

    def _forward(self, step: StepInput, experts: ExpertExecutor | None):
        """Last-token logits ``[B, V]``, tokens computed, and the prompt logprobs the step's
        ``prompt_scores`` ask for (sequence index -> entries), or None."""
        batch = self._batch(step.seqs)
        self.cache.reserve(batch.max_len)
        observer = self.recorder.observer if self.recorder else None
        scored = step.prompt_scores  # [(sequence index, first row in T, targets)]
        rows = None
        if scored:
            extra = [first + i for _, first, targets in scored for i in range(len(targets))]
            rows = torch.cat((batch.last_token, torch.tensor(extra, dtype=torch.long))).to(self.device)
        logits = self.model(batch, self.cache, experts=experts, on_route=observer, rows=rows)
        if self.recorder:
            self.recorder.end_step([step.seqs[i].seq_id for i in batch.seq_index.tolist()], batch.positions.cpu(),
                                   [s.generated == 0 for s in step.seqs for _ in s.tokens])
        if not scored:
            return logits, batch.num_tokens, None
        logits, extra_logits = logits[: len(step.seqs)], logits[len(step.seqs):].float().cpu()
        out, at = {}, 0
        for b, _, targets in scored:
            out[b] = score_prompt(extra_logits[at : at + len(targets)], targets, step.seqs[b].params.prompt_logprobs)
            at += len(targets)
        return logits, batch.num_tokens, out

    def _forward_two(self, step: StepInput, experts: SplitExperts) -> tuple[torch.Tensor, int]:
        if self.recorder is not None:
            raise ValueError("a routing trace records whole steps: run the step as one micro-batch")
        first = step.micro_batches[0]
        batches = [self._batch(step.seqs[:first]), self._batch(step.seqs[first:])]
        self.cache.reserve(max(b.max_len for b in batches))
        parts = two_batch_forward([self.model.layer_steps(b, self.cache) for b in batches], experts)
        return torch.cat(parts), sum(b.num_tokens for b in batches)
