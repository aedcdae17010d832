"""Baseline placements (vLLM's choices): ``linear`` and ``round_robin``.

Both place every logical expert once (no replicas) and the same way in every layer:

* linear: rank r hosts the contiguous block [start_r, start_r + n_r) with
  ``n_r = E // R + (r < E % R)`` (the first E % R ranks take one more expert);
* round_robin: expert e on rank e % R.

Slots are rank-major (rank 0's slots first), experts ascending within a rank.
"""

from __future__ import annotations

import numpy as np

from raymoe.placement.affinity import slot_capacity
from raymoe.placement.plan import Layout


def linear_layout(num_layers: int, num_experts: int, num_ranks: int) -> Layout:
    """phy2log, slot2rank: [layers, experts]; rank r hosts a contiguous block."""
    slot2rank = np.repeat(np.arange(num_ranks), slot_capacity(num_experts, num_ranks))
    return Layout(np.tile(np.arange(num_experts), (num_layers, 1)), np.tile(slot2rank, (num_layers, 1)))


def round_robin_layout(num_layers: int, num_experts: int, num_ranks: int) -> Layout:
    """phy2log, slot2rank: [layers, experts]; expert e on rank e % R."""
    slot_capacity(num_experts, num_ranks)   # raises when ranks > experts
    phy2log = np.concatenate([np.arange(r, num_experts, num_ranks) for r in range(num_ranks)])
    return Layout(np.tile(phy2log, (num_layers, 1)), np.tile(phy2log % num_ranks, (num_layers, 1)))
