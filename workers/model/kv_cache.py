"""Paged KV cache: fixed-size blocks in one pool per layer, found through per-sequence
block tables (vLLM's PagedAttention layout).

Per layer it holds two tensors ``k [(N + 1) * S, *k_shape]`` and ``v [(N + 1) * S, *v_shape]``
(N = blocks in the pool, S = ``block_size`` tokens per block; for MLA: the compressed
latent and the rotary key). Token ``p`` of the sequence in slot ``s`` lives at row
``tables[s, p // S] * S + p % S``. ``tables [slots, max_blocks]`` is filled from the
block ids the scheduler hands out (``workers/block_pool.py``); entries a sequence does
not use point at the scratch block N, which is also where padding rows write. Reads
copy the step's sequences' blocks, a whole block at a time, into ``[B, L, ...]`` (one
``index_select`` per layer and tensor: the portable path, on CPUs and GPUs alike; a paged
attention kernel that reads through the tables without the copy is not used).

Shapes: B = sequences read, L = positions read, T = tokens written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """``num_blocks`` blocks of ``block_size`` tokens; one sequence holds at most ``max_blocks``."""

    num_blocks: int
    block_size: int
    max_blocks: int

    @property
    def capacity(self) -> int:
        """Positions one sequence can hold."""
        return self.max_blocks * self.block_size

    @property
    def tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    @classmethod
    def for_sequences(cls, num_seqs: int, max_seq_len: int, block_size: int = 16) -> "KVLayout":
        """A pool that holds ``num_seqs`` sequences of ``max_seq_len`` tokens at once."""
        blocks = math.ceil(max_seq_len / block_size)
        return cls(num_seqs * blocks, block_size, blocks)


def token_bytes(shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], dtype: torch.dtype) -> int:
    """Bytes of cache one token takes across the layers."""
    return sum(math.prod(k) + math.prod(v) for k, v in shapes) * torch.empty(0, dtype=dtype).element_size()


class KVCacheBudgetError(ValueError):
    """The KV-cache memory budget cannot hold one sequence of the longest length."""

    def __init__(self, budget: int, needed: int, fix: str):
        self.budget, self.needed, self.fix = budget, needed, fix
        super().__init__(f"a KV-cache budget of {budget} bytes holds less than one {needed}-byte sequence; {fix}")


def plan_layout(shapes, dtype: torch.dtype, memory_bytes: int, max_seq_len: int, block_size: int) -> KVLayout:
    """The pool a budget of ``memory_bytes`` holds, for sequences of up to ``max_seq_len`` tokens."""
    block = token_bytes(shapes, dtype) * block_size
    max_blocks = math.ceil(max_seq_len / block_size)
    num_blocks = memory_bytes // block
    if num_blocks < max_blocks:
        raise KVCacheBudgetError(memory_bytes, max_blocks * block,
                                 f"raise batching.kv_cache_memory to at least {max_blocks * block} "
                                 f"or lower batching.max_seq_len")
    return KVLayout(num_blocks, block_size, max_blocks)


DEFAULT_POOL_SEQS = 16  # with no memory budget: the pool holds this many sequences of the longest length


def kv_layout(shapes, dtype: torch.dtype, memory_bytes: int | None, max_seq_len: int, block_size: int) -> KVLayout:
    """The pool of a deployment or engine: sized by ``memory_bytes``, or by default for
    ``DEFAULT_POOL_SEQS`` sequences of ``max_seq_len`` tokens (the most the slot cache
    that came before it could hold with its default 16 slots)."""
    if memory_bytes is None:
        return KVLayout.for_sequences(DEFAULT_POOL_SEQS, max_seq_len, block_size)
    return plan_layout(shapes, dtype, memory_bytes, max_seq_len, block_size)


class KVCache:
    def __init__(self, shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], num_slots: int, layout: KVLayout,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.shapes, self.num_slots, self.layout = shapes, num_slots, layout
        self.dtype, self.device = dtype, device
        self.block_size, self.scratch = layout.block_size, layout.num_blocks
        rows = (layout.num_blocks + 1) * layout.block_size
        self.k = [torch.zeros(rows, *k, dtype=dtype, device=device) for k, _ in shapes]
        self.v = [torch.zeros(rows, *v, dtype=dtype, device=device) for _, v in shapes]
        self.tables = torch.full((num_slots, layout.max_blocks), self.scratch, dtype=torch.long, device=device)
        self._known: list[tuple[int, ...]] = [()] * num_slots  # what each slot's table row holds, host side

    @classmethod
    def contiguous(cls, shapes, num_slots: int, capacity: int, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", block_size: int = 16) -> "KVCache":
        """Slot ``s`` owns its own run of blocks, enough for ``capacity`` positions (no
        scheduler needed: for tests and tools that drive the model directly)."""
        layout = KVLayout.for_sequences(num_slots, capacity, block_size)
        cache = cls(shapes, num_slots, layout, dtype, device)
        for slot in range(num_slots):
            cache.set_blocks(slot, range(slot * layout.max_blocks, (slot + 1) * layout.max_blocks))
        return cache

    @property
    def capacity(self) -> int:
        return self.layout.capacity

    def set_blocks(self, slot: int, blocks) -> None:
        """The block table of the sequence in ``slot`` (its blocks in position order)."""
        blocks = tuple(blocks)
        if blocks == self._known[slot]:
            return
        if len(blocks) > self.layout.max_blocks:
            raise ValueError(f"{len(blocks)} blocks do not fit a block table of {self.layout.max_blocks}")
        row = torch.full((self.layout.max_blocks,), self.scratch, dtype=torch.long)
        row[: len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        self.tables[slot].copy_(row)
        self._known[slot] = blocks

    def reserve(self, length: int) -> None:
        """Check that sequences of ``length`` tokens fit the block tables."""
        if length > self.capacity:
            raise ValueError(f"a sequence of {length} tokens does not fit the KV cache's {self.capacity} positions")

    def token_rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The pool row of each ``(slots[t], positions[t])`` ``[T]``."""
        s = self.block_size
        return self.tables[slots, positions // s] * s + positions % s

    def context_blocks(self, slots: torch.Tensor, length: int) -> torch.Tensor:
        """The blocks that hold positions ``0 .. length - 1`` of each slot ``[B, ceil(L / S)]``."""
        return self.tables[slots, : -(-length // self.block_size)]

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rows: torch.Tensor | None = None) -> None:
        """Store ``k [T, *k_shape]``, ``v [T, *v_shape]`` at ``(slots[t], positions[t])``
        (``rows``: their ``token_rows``, when the caller has them)."""
        rows = self.token_rows(slots, positions) if rows is None else rows
        self.k[layer].index_copy_(0, rows, k.to(self.dtype))
        self.v[layer].index_copy_(0, rows, v.to(self.dtype))

    def read(self, layer: int, blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``k [B, L, *k_shape]``, ``v [B, L, *v_shape]``: positions ``0 .. L - 1`` of the
        sequences whose blocks are ``blocks [B, ceil(L / S)]`` (``context_blocks``), copied a
        whole block at a time (views of the copy, cut at L)."""
        flat, (b, n), s = blocks.reshape(-1), blocks.shape, self.block_size
        k, v = self.k[layer], self.v[layer]
        k = k.view(-1, s * k[0].numel()).index_select(0, flat).view(b, n * s, *k.shape[1:])
        v = v.view(-1, s * v[0].numel()).index_select(0, flat).view(b, n * s, *v.shape[1:])
        return k[:, :length], v[:, :length]
