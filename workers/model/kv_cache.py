"""KV cache with one slot per sequence; slots are reused when a request ends.

Per layer it holds two tensors ``k [slots, capacity, *k_shape]`` and
``v [slots, capacity, *v_shape]`` (for MLA: the compressed latent and the rotary key).
Capacity grows on demand, so short requests do not pay for the longest one.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], num_slots: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 initial_capacity: int = 64):
        self.shapes, self.num_slots, self.dtype, self.device = shapes, num_slots, dtype, device
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._grow(initial_capacity)

    def _grow(self, capacity: int) -> None:
        new_k, new_v = [], []
        for layer, (k_shape, v_shape) in enumerate(self.shapes):
            k = torch.zeros(self.num_slots, capacity, *k_shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(self.num_slots, capacity, *v_shape, dtype=self.dtype, device=self.device)
            if self.capacity:
                k[:, : self.capacity] = self.k[layer]
                v[:, : self.capacity] = self.v[layer]
            new_k.append(k)
            new_v.append(v)
        self.k, self.v, self.capacity = new_k, new_v, capacity

    def reserve(self, length: int) -> None:
        """Make room for sequences of ``length`` tokens."""
        if length > self.capacity:
            self._grow(max(length, 2 * self.capacity))

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k [T, *k_shape]``, ``v [T, *v_shape]`` at ``(slots[t], positions[t])``."""
        self.k[layer].index_put_((slots, positions), k.to(self.dtype))
        self.v[layer].index_put_((slots, positions), v.to(self.dtype))

    def read(self, layer: int, slots: torch.Tensor, length: int,
             first_slot: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``k [B, length, *k_shape]``, ``v [B, length, *v_shape]`` of the given slots.

        When ``slots`` is the contiguous range starting at ``first_slot``, both are views
        into the cache (no copy): later writes to those rows show through.
        """
        if first_slot is not None:
            rows = slice(first_slot, first_slot + len(slots))
            return self.k[layer][rows, :length], self.v[layer][rows, :length]
        return self.k[layer][slots, :length], self.v[layer][slots, :length]
