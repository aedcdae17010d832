"""Placement plans for tests, built by hand so the runtime tests do not depend on a policy."""

from __future__ import annotations

import numpy as np

from raymoe.placement.plan import PlacementPlan


def random_plan(num_experts: int, ranks: int, redundant: int, seed: int, layers: int = 1) -> PlacementPlan:
    """Per layer: a random permutation of the experts, then ``redundant`` replicas of
    distinct experts; slot s sits on rank s % ranks, and no rank holds two copies of one
    expert. Needs ``redundant < ranks <= num_experts``."""
    rng = np.random.default_rng(seed)
    slot2rank = np.arange(num_experts + redundant) % ranks
    rows = []
    for _ in range(layers):
        base = rng.permutation(num_experts)
        extra: list[int] = []
        for slot in range(num_experts, num_experts + redundant):
            candidates = [int(e) for p, e in enumerate(base) if p % ranks != slot2rank[slot] and int(e) not in extra]
            extra.append(int(rng.choice(candidates)))
        rows.append(np.concatenate([base, np.asarray(extra, dtype=np.int64)]))
    return PlacementPlan(num_ranks=ranks, num_nodes=1, num_experts=num_experts, phy2log=np.stack(rows),
                         slot2rank=np.tile(slot2rank, (layers, 1)), policy="test", params={}, objectives={})


def linear_plan(num_experts: int, ranks: int, layers: int) -> PlacementPlan:
    """Rank r holds a contiguous block of experts (the first E % R ranks one more)."""
    sizes = [num_experts // ranks + (r < num_experts % ranks) for r in range(ranks)]
    slot2rank = np.repeat(np.arange(ranks), sizes)
    return PlacementPlan(num_ranks=ranks, num_nodes=1, num_experts=num_experts,
                         phy2log=np.tile(np.arange(num_experts), (layers, 1)), slot2rank=np.tile(slot2rank, (layers, 1)),
                         policy="linear", params={}, objectives={})
