"""Dispatch tables of one MoE layer, built from a placement plan.

Glossary (DESIGN.md): logical expert ``e``, slot ``s`` (one copy of an expert),
``log2phy [E, R]`` (-1 padded), ``logcnt [E]``, ``slot2rank [S]``. Expert rank ``r``
holds its slots in slot order; ``slot_local[s]`` is a slot's index among them, which is
the row of that rank's ``ExpertStack``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LayerMap:
    """Shapes: E = logical experts, R = most replicas of one expert, S = slots."""

    log2phy: torch.Tensor  # int64 [E, R], -1 padded
    logcnt: torch.Tensor  # int64 [E]
    slot_rank: torch.Tensor  # int64 [S]
    slot_local: torch.Tensor  # int64 [S]
    rank_experts: tuple[tuple[int, ...], ...]  # per rank: logical expert of each local slot

    def __post_init__(self):
        # Without replicas a pair's rank and local slot depend on its expert alone: tables [E].
        direct = None
        if bool((self.logcnt <= 1).all()):
            first = self.log2phy[:, 0]
            direct = (self.slot_rank[first], self.slot_local[first])
        object.__setattr__(self, "_direct", direct)

    @property
    def num_ranks(self) -> int:
        return len(self.rank_experts)

    def ranks_and_locals(self, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank and the local slot of every pair of the step's tokens ``topk_ids [T, A]``
        (token t is the step's token t, for the replica rule) -> two ``[T, A]``."""
        if self._direct is not None:
            rank, local = self._direct
            return rank[topk_ids], local[topk_ids]
        slot = self.slots(topk_ids, torch.arange(topk_ids.shape[0], device=topk_ids.device))
        return self.slot_rank[slot], self.slot_local[slot]

    def slots(self, topk_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The slot each (token, expert) pair runs on: ``topk_ids [n, A]`` of tokens
        ``tokens [n]`` (global indices in the step) -> slots ``[n, A]``.

        The replica rule, written once: a token of a replicated expert goes to replica
        ``token % logcnt[e]``, which spreads the expert's tokens evenly over its copies
        (and is the same on every rank, whichever rank computes it)."""
        return self.log2phy[topk_ids, tokens[:, None] % self.logcnt[topk_ids]]

    def to(self, device: torch.device | str) -> "LayerMap":
        return LayerMap(self.log2phy.to(device), self.logcnt.to(device), self.slot_rank.to(device),
                        self.slot_local.to(device), self.rank_experts)


def layer_maps(plan) -> list[LayerMap]:
    """One ``LayerMap`` per MoE layer of a ``placement.plan.PlacementPlan``."""
    maps = []
    for layer in range(plan.num_layers):
        slot2rank = np.asarray(plan.slot2rank[layer])
        local = np.zeros_like(slot2rank)
        for rank in range(plan.num_ranks):
            mine = np.flatnonzero(slot2rank == rank)
            local[mine] = np.arange(len(mine))
        maps.append(LayerMap(
            log2phy=torch.tensor(np.asarray(plan.log2phy[layer]), dtype=torch.long),
            logcnt=torch.tensor(np.asarray(plan.logcnt[layer]), dtype=torch.long),
            slot_rank=torch.tensor(slot2rank, dtype=torch.long),
            slot_local=torch.tensor(local, dtype=torch.long),
            rank_experts=tuple(tuple(int(e) for e in plan.rank_experts(layer, r)) for r in range(plan.num_ranks)),
        ))
    return maps


def without_ranks(maps: list[LayerMap], ranks: set[int]) -> list[LayerMap] | None:
    """The maps with every slot on ``ranks`` out of use: each expert is dispatched only to
    its replicas on the other ranks (``log2phy``/``logcnt`` shrink; slot ids, ``slot_local``
    and the other ranks' slots stay as they are, so their stacks need no change). None
    when some expert of some layer has no replica left."""
    out = []
    for m in maps:
        gone = torch.tensor([int(r) in ranks for r in m.slot_rank.tolist()])
        log2phy = torch.full_like(m.log2phy, -1)
        logcnt = torch.zeros_like(m.logcnt)
        for expert, row in enumerate(m.log2phy.tolist()):
            slots = [slot for slot in row if slot >= 0 and not gone[slot]]
            if not slots:
                return None
            log2phy[expert, :len(slots)] = torch.tensor(slots)
            logcnt[expert] = len(slots)
        rank_experts = tuple(() if r in ranks else experts for r, experts in enumerate(m.rank_experts))
        out.append(LayerMap(log2phy, logcnt, m.slot_rank, m.slot_local, rank_experts))
    return out
