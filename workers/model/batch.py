"""A forward batch: the new tokens of B sequences flattened to T tokens.

Sequences can be at different points (a prompt being prefilled next to sequences
decoding one token), which is what continuous batching needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardBatch:
    """T = total new tokens, B = sequences.

    input_ids [T], positions [T], seq_index [T] (which sequence), query_index [T] (index
    among its sequence's new tokens), slots [B] (KV-cache slot), lengths [B] (sequence
    length after this step), last_token [B] (index in T of each sequence's last token).
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
        return cls(input_ids=input_ids, positions=positions, seq_index=seq_index, query_index=query_index,
                   slots=seq_slots, lengths=lengths, last_token=offsets + counts - 1,
                   max_new=int(counts.max()) if len(counts) else 0,
                   max_len=int(lengths.max()) if len(lengths) else 0)

    def to(self, device: torch.device) -> "ForwardBatch":
        if device.type == "cpu":
            return self
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return ForwardBatch(**moved)

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
        counts = torch.tensor([len(t) for t in tokens])
        start = torch.tensor(starts)
        seq_index = torch.repeat_interleave(torch.arange(len(tokens)), counts)
        offsets = torch.cumsum(counts, 0) - counts
        query_index = torch.arange(int(counts.sum())) - offsets[seq_index]
        lengths = start + counts
        return cls(
            input_ids=torch.tensor([i for t in tokens for i in t], dtype=torch.long),
            positions=start[seq_index] + query_index,
            seq_index=seq_index,
            query_index=query_index,
            slots=torch.tensor(slots if slots is not None else list(range(len(tokens)))),
            lengths=lengths,
            last_token=offsets + counts - 1,
            max_new=int(counts.max()),
            max_len=int(lengths.max()),
        )
