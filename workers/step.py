"""What the coordinator sends each actor per step, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raymoe.workers.sampling import History, SamplingParams, TokenLogprob
from raymoe.workers.stats import LayerTraffic, StepStats


@dataclass(frozen=True)
class SeqStep:
    """One sequence's part of a step: its pending tokens, fed from position ``start``;
    ``generated`` tokens of it were sampled before this step. ``slot``: its row of the
    block tables; ``blocks``: its KV-cache blocks in position order (``workers/model/kv_cache.py``)."""

    seq_id: int
    slot: int
    tokens: list[int]
    start: int
    generated: int
    params: SamplingParams
    history: History = History()  # what its logits processors need (workers/sampling.py)
    blocks: tuple[int, ...] = ()
    # prompt logprobs (echo): rows offset, offset + 1, ... of ``tokens`` score the next
    # token of the prompt, ``targets`` (empty: none)
    prompt_scores: tuple[int, tuple[int, ...]] = (0, ())


@dataclass(frozen=True)
class StepInput:
    step_id: int
    seqs: list[SeqStep]
    return_logits: bool = False
    # Sequences per micro-batch: () or (B,) runs the step whole, (B0, B1) as two
    # interleaved micro-batches, seqs[:B0] and seqs[B0:] (``workers/overlap.py``).
    micro_batches: tuple[int, ...] = ()

    @property
    def prompt_scores(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """``(sequence index, first row in the step's T tokens, targets)`` of every
        sequence that scores prompt tokens this step (tokens in ``seqs`` order)."""
        out, start = [], 0
        for b, s in enumerate(self.seqs):
            offset, targets = s.prompt_scores
            if targets:
                out.append((b, start + offset, targets))
            start += len(s.tokens)
        return out

    @property
    def decode(self) -> bool:
        """Every sequence feeds exactly one token."""
        return all(len(s.tokens) == 1 for s in self.seqs)


@dataclass
class StepOutput:
    tokens: list[int]  # one sampled token per sequence, in ``seqs`` order
    stats: StepStats
    logits: torch.Tensor | None = None  # [B, V] float32 when asked for
    logprobs: list[TokenLogprob | None] | None = None  # per sequence, for those whose params ask
    prompt_logprobs: dict[int, list[TokenLogprob]] | None = None  # sequence index -> its prompt_scores' entries


@dataclass
class WorkerStepStats:
    """What one expert rank did during a step."""

    expert_seconds: float = 0.0
    pairs: list[int] = field(default_factory=list)  # per MoE layer
    layers: list[LayerTraffic] = field(default_factory=list)  # per MoE layer: what this rank's collectives sent
