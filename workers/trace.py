"""Routing traces: which experts every token chose at every MoE layer.

The format is documented in docs/formats.md; ``placement/`` reads it.
Shapes: T = tokens, L = MoE layers, A = activated experts per token, E = experts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raymoe.workers.model.router import Routing

TRACE_VERSION = 1


class TraceRecorder:
    """Collects routing step by step; ``save`` writes the ``.npz`` trace."""

    def __init__(self, moe_layers: tuple[int, ...], num_experts: int):
        self.moe_layers, self.num_experts = tuple(moe_layers), num_experts
        self._ids: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._meta: list[np.ndarray] = []  # [T, 3]: seq id, position, is_prompt
        self._step: list[Routing | None] = []

    def observer(self, moe_index: int, routing: Routing) -> None:
        """A ``RouteObserver`` for the model's forward pass."""
        if moe_index == 0:
            self._step = [None] * len(self.moe_layers)
        self._step[moe_index] = routing

    def end_step(self, seq_ids: list[int], positions: torch.Tensor, is_prompt: list[bool]) -> None:
        """Close the step whose routing the observer saw; one entry per token of the batch."""
        if not self._step or any(r is None for r in self._step):
            return
        self._ids.append(torch.stack([r.topk_ids for r in self._step], 1).to(torch.int32).numpy())
        self._weights.append(torch.stack([r.topk_weights for r in self._step], 1).float().numpy())
        self._meta.append(np.stack([np.asarray(seq_ids), positions.numpy(), np.asarray(is_prompt)], 1))
        self._step = []

    @property
    def topk_ids(self) -> np.ndarray:
        """int32 ``[T, L, A]``."""
        return np.concatenate(self._ids) if self._ids else np.zeros((0, len(self.moe_layers), 0), np.int32)

    def loads(self) -> np.ndarray:
        """Tokens per expert per MoE layer, int64 ``[L, E]``."""
        ids = self.topk_ids
        return np.stack([np.bincount(ids[:, l].ravel(), minlength=self.num_experts)
                         for l in range(ids.shape[1])]) if len(ids) else np.zeros((0, self.num_experts), np.int64)

    def save(self, path: str | Path) -> None:
        meta = np.concatenate(self._meta) if self._meta else np.zeros((0, 3), np.int64)
        weights = np.concatenate(self._weights) if self._weights else np.zeros(self.topk_ids.shape, np.float32)
        np.savez_compressed(
            path,
            topk_ids=self.topk_ids,
            topk_weights=weights.astype(np.float32),
            seq_ids=meta[:, 0].astype(np.int64),
            positions=meta[:, 1].astype(np.int64),
            is_prompt=meta[:, 2].astype(bool),
            moe_layers=np.asarray(self.moe_layers, np.int32),
            num_experts=np.int64(self.num_experts),
            version=np.int64(TRACE_VERSION),
        )
