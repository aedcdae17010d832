"""Two-batch overlap: a decode step run as two micro-batches, so that the front-end's
attention of one runs while the expert ranks compute the other (the ping-pong of
MegaScale-Infer and SGLang's two-batch overlap), and the rule that decides when.

The order of the collectives, on every rank (d = dispatch, c = combine, 0/1 = micro-batch,
L = MoE layer, n layers)::

    d0(0) d1(0) c0(0) d0(1) c1(0) d1(1) c0(1) ... d1(n-1) c0(n-1) c1(n-1)

    front-end:   attn0(L+1) | send d0(L+1) | wait c1(L) | attn1(L+1) | send d1(L+1) | wait c0(L+1)
    expert rank: out1(L)    | recv d0(L+1) | send c1(L) | out0(L+1)  | recv d1(L+1) | send c0(L+1)

Each collective stays blocking and every rank issues them in the same order; the overlap
comes from what each side computes before its next collective. Per MoE layer this is two
collectives per micro-batch (four), against two for the step run whole: it pays only
where the compute it hides is larger than the extra collectives cost, which is what the
``auto`` rule measures.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generator, Protocol

if TYPE_CHECKING:  # this module is imported by the config, which stays free of torch
    import torch

    from raymoe.workers.model.decoder import MoERequest

MODES = ("auto", "on", "off")


class SplitExperts(Protocol):
    """An ExpertExecutor cut at its collectives: ``send`` packs and dispatches one
    micro-batch's request (returns what ``receive`` needs), ``receive`` waits for its
    combine and returns the combined ``[T, D]``."""

    def send(self, moe_index: int, layer: int, x: torch.Tensor, routing) -> object: ...

    def receive(self, sent: object) -> torch.Tensor: ...


def two_batch_forward(runs: list[Generator[MoERequest, torch.Tensor, torch.Tensor]],
                      experts: SplitExperts) -> list[torch.Tensor]:
    """Drive two ``MoEForCausalLM.layer_steps`` generators (two micro-batches of one step,
    same MoE layers) in the order of the module docstring; returns each one's logits."""
    assert len(runs) == 2, "two micro-batches"
    pending: list[object] = [None, None]
    logits: list[torch.Tensor | None] = [None, None]
    for i, run in enumerate(runs):
        try:
            pending[i] = experts.send(*next(run))
        except StopIteration as done:  # no MoE layer
            logits[i] = done.value
    live = [i for i in (0, 1) if logits[i] is None]
    while live:
        for i in list(live):
            combined = experts.receive(pending[i])
            try:
                pending[i] = experts.send(*runs[i].send(combined))
            except StopIteration as done:
                logits[i] = done.value
                live.remove(i)
    return logits


def halves(num_seqs: int) -> tuple[int, int]:
    """Micro-batch sizes (sequences) of a step split in two, the larger first."""
    return (num_seqs + 1) // 2, num_seqs // 2


@dataclass
class _Bucket:
    seconds: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    choice: bool | None = None  # None while measuring
    steps_since: int = 0


class OverlapRule:
    """Decides, per step, whether a decode step runs as two micro-batches.

    ``on``: every decode step of at least 2 sequences; ``off``: never; ``auto``: measured.
    Steps are grouped in buckets by batch size (powers of two). A bucket's first
    ``2 * trials`` decode steps alternate the two modes; it then keeps the mode whose
    median seconds per sequence was lower, and measures again after ``recheck`` steps
    (the load, and so the answer, can change). Prefill steps and steps of one sequence
    always run whole.
    """

    def __init__(self, mode: str = "auto", trials: int = 4, recheck: int = 1024):
        if mode not in MODES:
            raise ValueError(f"overlap mode {mode!r}: expected one of {list(MODES)}")
        self.mode, self.trials, self.recheck = mode, trials, recheck
        self.buckets: dict[int, _Bucket] = {}
        self.paused = False  # e.g. while a routing trace is recorded (it wants whole steps)

    @staticmethod
    def bucket_of(num_seqs: int) -> int:
        return 1 << (num_seqs - 1).bit_length()

    def split(self, num_seqs: int, decode: bool) -> tuple[int, ...]:
        """Micro-batch sizes (sequences) for a step: ``(B,)`` whole or two halves."""
        if self.paused or not decode or num_seqs < 2 or self.mode == "off":
            return (num_seqs,)
        if self.mode == "on":
            return halves(num_seqs)
        bucket = self.buckets.setdefault(self.bucket_of(num_seqs), _Bucket())
        if bucket.choice is None:
            tried = bucket.seconds
            overlap = len(tried[True]) < len(tried[False])  # alternate, whole first
        else:
            overlap = bucket.choice
        return halves(num_seqs) if overlap else (num_seqs,)

    def observe(self, split: tuple[int, ...], decode: bool, seconds: float) -> None:
        """A step's wall seconds, as run with ``split`` (from ``split``)."""
        num_seqs = sum(split)
        if self.mode != "auto" or self.paused or not decode or num_seqs < 2:
            return
        bucket = self.buckets.get(self.bucket_of(num_seqs))
        if bucket is None:
            return
        if bucket.choice is not None:
            bucket.steps_since += 1
            if bucket.steps_since >= self.recheck:
                self.buckets[self.bucket_of(num_seqs)] = _Bucket()
            return
        bucket.seconds[len(split) == 2].append(seconds / num_seqs)
        if min(len(v) for v in bucket.seconds.values()) >= self.trials:
            bucket.choice = statistics.median(bucket.seconds[True]) < statistics.median(bucket.seconds[False])

    def decisions(self) -> dict[int, bool | None]:
        """Per bucket: True (overlap), False (whole), None (still measuring)."""
        return {b: v.choice for b, v in sorted(self.buckets.items())}
