"""CoherentRank: a Ray actor of the coherent layout (ExFlow). Every rank holds the
embeddings, attention, dense layers, routers, shared experts and LM head, its own
expert slots, and a KV-cache replica of every sequence.

A step: every rank gets the same step input and computes every token up to the first
MoE layer (replicated: no communication), which sends each token to its home; from
then on a token runs attention and dense layers where it is and at each MoE layer
moves to where its experts are (``workers/dispatch/coherent.py``). After the last layer the
rank it ended on computes its logits and samples (sampling is stateless, so any rank
can). KV rows are all-gathered (``workers/coherent_cache.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from raymoe.workers.coherent_cache import CoherentKVCache
from raymoe.workers.dispatch.coherent import CoherentMoE, Hosted
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.guided import guide_masks, model_guides
from raymoe.workers.experts import load_expert_stacks, refuse_quantized_move
from raymoe.workers.model.attention import cache_shapes
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import Checkpoint, load_model
from raymoe.workers.model.kv_cache import KVLayout
from raymoe.workers.rank import RankActor
from raymoe.workers.reference import checkpoint_eos_ids
from raymoe.workers.replan import MoveStats, move_experts
from raymoe.workers.sampling import TokenLogprob, prompt_logprobs, sample_and_score, score
from raymoe.workers.stats import LayerTraffic
from raymoe.workers.step import StepInput


@dataclass
class CoherentOutput:
    """One rank's share of a step: tokens (and logits) of the sequences it finished on."""

    tokens: dict[int, int]  # sequence index in the step -> sampled token
    logits: dict[int, torch.Tensor]
    layers: list[LayerTraffic]
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # of those whose params ask
    # prompt logprobs of the prompt rows hosted here at the end: sequence -> [(row among its targets, entry)]
    prompt_logprobs: dict[int, list[tuple[int, TokenLogprob]]] = field(default_factory=dict)
    coherence_bytes: int = 0
    coherence_collectives: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class CoherentRank(RankActor):
    def __init__(self, model_path: str, dtype: torch.dtype, rank: int, maps: list[LayerMap], max_seqs: int,
                 kv: KVLayout, moge_groups: int | None = None, threads: int = 1,
                 quantization: tuple[str, int] = ("none", 32)):
        super().__init__(threads)
        self.quantization = quantization
        ckpt = Checkpoint(model_path, moge_groups)
        self.model = load_model(model_path, dtype, moge_groups, with_experts=False, checkpoint=ckpt).to(self.device)
        self.config, self.dtype, self.rank_index, self.max_seqs, self.kv = ckpt.config, dtype, rank, max_seqs, kv
        self.maps = [m.to(self.device) for m in maps]
        self.stacks = load_expert_stacks(ckpt, maps, rank, dtype, self.device, quantization)
        self.num_ranks = maps[0].num_ranks
        self.guides = model_guides(model_path, self.config.vocab_size, checkpoint_eos_ids(model_path, self.config))

    def join(self, backend: str, address: str, rank: int, world_size: int, timeout_s: float) -> int:
        super().join(backend, address, rank, world_size, timeout_s)
        self.cache = CoherentKVCache(cache_shapes(self.config), self.max_seqs, self.kv, self.dtype, self.device,
                                     self.collectives)
        self.moe = CoherentMoE(self.maps, self.stacks, self.collectives, rank, self.config.top_k)
        return rank

    @torch.inference_mode()
    def set_maps(self, maps: list[LayerMap]) -> MoveStats:
        """Take up a new plan: expert weights move between the ranks (``workers/replan.py``)."""
        refuse_quantized_move(self.quantization)
        shape = (self.config.hidden_size, self.config.moe_intermediate_size)
        self.stacks, stats = move_experts(self.stacks, self.maps, maps, self.rank_index, 0, self.collectives, shape,
                                          self.dtype, self.device)
        self.maps = [m.to(self.device) for m in maps]
        self.moe = CoherentMoE(self.maps, self.stacks, self.collectives, self.rank_index, self.config.top_k)
        return stats

    @torch.inference_mode()
    def step(self, step: StepInput) -> CoherentOutput:
        """One forward pass over the whole step. All ranks must run it together."""
        started = time.perf_counter()
        before = self.collectives.snapshot()
        for s in step.seqs:
            self.cache.set_blocks(s.slot, s.blocks)
        tokens, slots, positions, seq_of = self._flatten(step)
        self.cache.reserve(int(positions.max()) + 1)
        self.cache.begin_step(eager=any(len(s.tokens) > 1 for s in step.seqs))
        self.cache.replicated = True  # until the first MoE layer every rank hosts every token
        hosted = Hosted(torch.arange(len(tokens), device=self.device), self.model.embed(tokens))
        layers, moe_index, moe_seconds = [], 0, 0.0
        for layer in self.model.decoder_layers:  # the decoder's own layer steps (workers/model/decoder.py)
            t = hosted.tokens
            batch = ForwardBatch.from_tokens(tokens[t], slots[t], positions[t])
            hosted.h = self._attend(layer, hosted.h, batch)
            if layer.is_moe:
                moe_started = time.perf_counter()
                hosted, traffic = self.moe(moe_index, layer, hosted, replicated=self.cache.replicated)
                self.cache.replicated = False
                moe_seconds += time.perf_counter() - moe_started
                layers.append(traffic)
                moe_index += 1
            elif len(t):
                hosted.h = layer.dense(hosted.h, layer.mlp_input(hosted.h))
        coherence_started = time.perf_counter()
        self.cache.flush()
        finished = time.perf_counter()
        out = self._sample(step, hosted, seq_of)
        moved = self.collectives.snapshot() - before
        out.layers = layers
        out.coherence_bytes, out.coherence_collectives = moved.bytes["kv_coherence"], moved.calls["kv_coherence"]
        out.seconds = {"attention": finished - started - moe_seconds - (finished - coherence_started),
                       "dispatch": moe_seconds, "coherence": finished - coherence_started}
        return out

    def _flatten(self, step: StepInput):
        """The step's tokens as global ``[T]`` tensors: ids, slots, positions, sequence index."""
        ids = [t for s in step.seqs for t in s.tokens]
        slots = [s.slot for s in step.seqs for _ in s.tokens]
        positions = [s.start + i for s in step.seqs for i in range(len(s.tokens))]
        seq_of = [b for b, s in enumerate(step.seqs) for _ in s.tokens]
        return tuple(torch.tensor(v, dtype=torch.long, device=self.device) for v in (ids, slots, positions, seq_of))

    def _attend(self, layer, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The layer's attention residual for the hosted tokens."""
        if batch.num_tokens:
            return layer.attend(h, batch, self.cache)
        # Nothing hosted here at this layer; still take part in the KV exchange.
        k_shape, v_shape = self.cache.shapes[layer.index]
        empty = batch.positions.new_empty(0)
        self.cache.write(layer.index, empty, empty, h.new_empty(0, *k_shape), h.new_empty(0, *v_shape))
        return h

    def _mine(self, step: StepInput, hosted: Hosted, seq_of: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Which hosted tokens are among the step's token ``rows`` and are this rank's to
        finish (each once: in a model without MoE layers every rank hosts every token,
        and a sequence's owner finishes it)."""
        mine = torch.isin(hosted.tokens, rows)
        if self.cache.replicated:
            owner = torch.tensor([s.slot % self.num_ranks for s in step.seqs], device=self.device)
            mine &= owner[seq_of[hosted.tokens]] == self.rank_index
        return mine

    def _sample(self, step: StepInput, hosted: Hosted, seq_of: torch.Tensor) -> CoherentOutput:
        """Logits and tokens for the sequences whose last token ended on this rank, and
        the prompt logprobs of the prompt rows that did."""
        last = torch.cumsum(torch.bincount(seq_of, minlength=len(step.seqs)), 0) - 1  # [B]
        mine = self._mine(step, hosted, seq_of, last)
        out = CoherentOutput({}, {}, [], prompt_logprobs=self._score_prompts(step, hosted, seq_of))
        if not mine.any():
            return out
        seqs = seq_of[hosted.tokens[mine]].tolist()
        logits = self.model.logits(hosted.h[mine]).float().cpu()
        chosen, scores = sample_and_score(logits, [step.seqs[b].params for b in seqs],
                                          [step.seqs[b].generated for b in seqs], [step.seqs[b].history for b in seqs],
                                          guide_masks(self.guides, [step.seqs[b] for b in seqs]))
        out.tokens = dict(zip(seqs, chosen))
        out.logits = {b: logits[i] for i, b in enumerate(seqs)} if step.return_logits else {}
        out.logprobs = {b: s for b, s in zip(seqs, scores) if s is not None}
        return out

    def _score_prompts(self, step: StepInput, hosted: Hosted, seq_of: torch.Tensor) -> dict:
        """``CoherentOutput.prompt_logprobs`` (``StepInput.prompt_scores``)."""
        targets = {first + i: (b, i, t) for b, first, ts in step.prompt_scores for i, t in enumerate(ts)}
        if not targets:
            return {}
        mine = self._mine(step, hosted, seq_of, torch.tensor(sorted(targets), device=self.device))
        if not mine.any():
            return {}
        logprobs = prompt_logprobs(self.model.logits(hosted.h[mine]).cpu())
        out: dict[int, list] = {}
        for k, row in enumerate(hosted.tokens[mine].tolist()):
            b, i, target = targets[row]
            out.setdefault(b, []).append((i, score(logprobs[k], target, step.seqs[b].params.prompt_logprobs)))
        return out
