"""Metrics against per-token loops that follow the written definitions (placement/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.placement.metrics import (coactivation_split_fraction, cross_device_fraction, decode_order, inter_node_fraction,
                               per_step_imbalance, score_plan)
from raymoe.placement.build import build_plan
from raymoe.placement.plan import PlacementPlan
from raymoe.placement.trace import trace_from_array


def ranks_of(plan: PlacementPlan, layer: int, expert: int) -> set[int]:
    return set(plan.slot2rank[layer, plan.phy2log[layer] == expert].tolist())


def loop_cross_device(plan: PlacementPlan, ids: np.ndarray, per_node: int = 1) -> float:
    """Token at i sits on each replica of i with equal probability, takes j's replica there
    when one exists (ranks grouped by ``per_node`` for the inter-node variant)."""
    local = total = 0.0
    for token in ids:
        for layer in range(ids.shape[1] - 1):
            for i in token[layer]:
                here = ranks_of(plan, layer, i)
                for j in token[layer + 1]:
                    there = {r // per_node for r in ranks_of(plan, layer + 1, j)}
                    local += sum((r // per_node) in there for r in here) / len(here)
                    total += 1
    return 1.0 - local / total


def loop_rank_loads(plan: PlacementPlan, ids: np.ndarray) -> np.ndarray:
    out = np.zeros((plan.num_layers, plan.num_ranks))
    for token in ids:
        for layer in range(ids.shape[1]):
            for e in token[layer]:
                ranks = ranks_of(plan, layer, e)
                for r in ranks:
                    out[layer, r] += 1.0 / len(ranks)
    return out


def random_ids(seed: int, tokens: int, layers: int, experts: int, top_k: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(tokens)])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([(8, 4, 2), (8, 2, 1), (6, 3, 1), (12, 4, 2)]),
       st.integers(1, 3), st.integers(0, 8))
def test_cross_device_and_loads_match_definitions(seed, shape, top_k, redundant):
    experts, ranks, nodes = shape
    ids = random_ids(seed, 25, 3, experts, top_k)
    trace = trace_from_array(ids, experts)
    redundant += -(experts + redundant) % ranks
    plan = build_plan("eplb", num_layers=3, num_experts=experts, num_ranks=ranks, num_nodes=nodes,
                      trace=trace.stats(), num_redundant=redundant)
    stats = trace.stats()
    assert cross_device_fraction(plan.presence, stats.transitions) == pytest.approx(loop_cross_device(plan, ids))
    assert inter_node_fraction(plan.presence, stats.transitions, nodes) == pytest.approx(
        loop_cross_device(plan, ids, per_node=ranks // nodes))
    score = score_plan(plan, stats)
    loads = loop_rank_loads(plan, ids)
    np.testing.assert_allclose(score.imbalance, loads.max(1) / loads.mean(1))


def test_coactivation_split_counts_pairs_without_a_common_rank():
    # 4 experts on 2 ranks: {0, 1} on rank 0, {2, 3} on rank 1
    plan = build_plan("linear", num_layers=1, num_experts=4, num_ranks=2)
    ids = np.array([[[0, 1]], [[0, 2]], [[2, 3]], [[1, 3]]])
    stats = trace_from_array(ids, 4).stats()
    assert coactivation_split_fraction(plan.presence, stats.coactivation) == pytest.approx(0.5)


def test_per_step_imbalance_matches_batches():
    ids = random_ids(1, 40, 2, 8, 2)
    plan = build_plan("round_robin", num_layers=2, num_experts=8, num_ranks=4)
    trace = trace_from_array(ids, 8)
    step = per_step_imbalance(plan.presence, trace, 16)
    assert step.num_batches == 2      # 40 tokens -> two full batches of 16, tail dropped
    values = []
    for b in range(2):
        loads = loop_rank_loads(plan, ids[16 * b:16 * (b + 1)])
        values += (loads.max(1) / loads.mean(1)).tolist()
    assert step.mean == pytest.approx(np.mean(values))
    assert step.max == pytest.approx(np.max(values))


def test_decode_order_interleaves_requests():
    ids = np.zeros((7, 1, 1), dtype=np.int64)
    trace = trace_from_array(ids, 2, seq_ids=np.array([5, 5, 5, 9, 9, 7, 7]))
    order = decode_order(trace)
    # step 0: first token of requests 5, 7, 9; step 1: second tokens; step 2: third token of 5
    assert order.tolist() == [0, 5, 3, 1, 6, 4, 2]
