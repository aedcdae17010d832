"""A forward batch: the new tokens of B sequences flattened to T tokens.

Sequences can be at different points (a prompt being prefilled next to sequences
decoding one token), which is what continuous batching needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Hashable, TypeVar

import numpy as np
import torch

T = TypeVar("T")


@dataclass(frozen=True)
class ForwardBatch:
    """T = total new tokens, B = sequences.

    input_ids [T], positions [T], seq_index [T] (which sequence), query_index [T] (index
    among its sequence's new tokens), slots [B] (KV-cache slot), lengths [B] (sequence
    length after this step), last_token [B] (index in T of each sequence's last token).
    ``decode``: every sequence has exactly one new token and token b is sequence b's
    (T == B, nothing to pad). ``min_len``: the shortest sequence length after this step.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    seq_index: torch.Tensor
    query_index: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    last_token: torch.Tensor
    max_new: int
    max_len: int
    min_len: int = 0
    decode: bool = False
    # What every layer derives from the batch (RoPE tables, attention mask), made once per step.
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def cached(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, computed on the first call with ``key`` and kept for this batch."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @classmethod
    def from_tokens(cls, input_ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> "ForwardBatch":
        """Tokens at arbitrary ``(slot, position)`` pairs (``[T]`` each; T may be 0): those
        of one slot form one sequence. Used where a step's tokens are spread over ranks."""
        device = input_ids.device
        seq_slots, seq_index = torch.unique(slots, return_inverse=True)
        order = torch.argsort(seq_index, stable=True)
        counts = torch.bincount(seq_index, minlength=len(seq_slots))
        offsets = torch.cumsum(counts, 0) - counts
        query_index = torch.empty_like(seq_index)
        query_index[order] = torch.arange(len(order), device=device) - offsets[seq_index[order]]
        lengths = torch.zeros(len(seq_slots), dtype=torch.long, device=device).scatter_reduce_(
            0, seq_index, positions + 1, "amax")
        if not len(counts):
            return cls(input_ids=input_ids, positions=positions, seq_index=seq_index, query_index=query_index,
                       slots=seq_slots, lengths=lengths, last_token=offsets + counts - 1, max_new=0, max_len=0)
        max_new, max_len, min_len = torch.stack((counts.max(), lengths.max(), lengths.min())).tolist()
        decode = max_new == 1 and bool(torch.equal(seq_index, torch.arange(len(seq_index), device=device)))
        return cls(input_ids=input_ids, positions=positions, seq_index=seq_index, query_index=query_index,
                   slots=seq_slots, lengths=lengths, last_token=offsets + counts - 1, max_new=max_new,
                   max_len=max_len, min_len=min_len, decode=decode)

    def to(self, device: torch.device) -> "ForwardBatch":
        if device.type == "cpu":
            return self
        moved = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_memo"}
        return ForwardBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in moved.items()})

    def parts(self) -> list[tuple["ForwardBatch", torch.Tensor | None]]:
        """The batch as attention runs it: ``[(self, None)]``, or, when sequences that
        decode one token sit beside sequences that feed several (chunked prefill), the
        decoding ones and the others as two sub-batches, each with the indices ``[T_i]``
        of its tokens in this batch. Padding every sequence to the longest one's new
        tokens would otherwise cost a decoding sequence as much attention as a prompt
        chunk. One read of the token counts to the host, once per batch."""
        return self.cached("parts", self._split)

    def _split(self) -> list[tuple["ForwardBatch", torch.Tensor | None]]:
        if self.decode or self.max_new == 1 or self.num_seqs == 1:
            return [(self, None)]
        counts = torch.bincount(self.seq_index, minlength=self.num_seqs)
        single = counts == 1
        if not bool(single.any()):
            return [(self, None)]
        parts = []
        for chosen in (single, ~single):
            seqs = torch.nonzero(chosen).flatten()
            renumber = torch.full_like(counts, -1)
            renumber[seqs] = torch.arange(len(seqs), device=seqs.device)
            tokens = torch.nonzero(chosen[self.seq_index]).flatten()
            lengths, new = self.lengths[seqs], counts[seqs]
            max_new, max_len, min_len = torch.stack((new.max(), lengths.max(), lengths.min())).tolist()
            seq_index = renumber[self.seq_index[tokens]]
            parts.append((ForwardBatch(
                input_ids=self.input_ids[tokens], positions=self.positions[tokens], seq_index=seq_index,
                query_index=self.query_index[tokens], slots=self.slots[seqs], lengths=lengths,
                last_token=torch.cumsum(new, 0) - 1, max_new=max_new, max_len=max_len, min_len=min_len,
                decode=max_new == 1), tokens))
        return parts

    @property
    def token_slots(self) -> torch.Tensor:
        """The KV-cache slot of each token ``[T]``."""
        return self.slots if self.decode else self.cached("token_slots", lambda: self.slots[self.seq_index])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.slots.shape[0])

    @classmethod
    def build(cls, tokens: list[list[int]], starts: list[int], slots: list[int] | None = None) -> "ForwardBatch":
        """``tokens[b]``: new token ids of sequence b; ``starts[b]``: tokens it already has cached."""
        if len(tokens) != len(starts) or not tokens or any(len(t) == 0 for t in tokens):
            raise ValueError("a forward batch needs >= 1 sequence, each with >= 1 new token")
        slots = slots if slots is not None else list(range(len(tokens)))
        sizes = [len(t) for t in tokens]
        ends = [s + n for s, n in zip(starts, sizes)]
        common = dict(max_new=max(sizes), max_len=max(ends), min_len=min(ends))
        if common["max_new"] == 1:  # decode: token b is sequence b's only new token
            index = list(range(len(tokens)))
            # One array for every field: numpy converts Python ints ~5x faster than torch.tensor.
            columns = np.array([[t[0] for t in tokens], starts, slots, index, [0] * len(index), ends], dtype=np.int64)
            ids, positions, slot, seq, query, lengths = torch.from_numpy(columns).unbind()
            return cls(input_ids=ids, positions=positions, seq_index=seq, query_index=query, slots=slot,
                       lengths=lengths, last_token=seq, decode=True, **common)
        counts = torch.tensor(sizes)
        start = torch.tensor(starts)
        seq_index = torch.repeat_interleave(torch.arange(len(tokens)), counts)
        offsets = torch.cumsum(counts, 0) - counts
        query_index = torch.arange(int(counts.sum())) - offsets[seq_index]
        return cls(
            input_ids=torch.tensor([i for t in tokens for i in t], dtype=torch.long),
            positions=start[seq_index] + query_index,
            seq_index=seq_index,
            query_index=query_index,
            slots=torch.tensor(slots),
            lengths=start + counts,
            last_token=offsets + counts - 1,
            **common,
        )
