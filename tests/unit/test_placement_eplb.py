"""EPLB-style replication: the published worked example, and properties on random loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.placement.errors import ConfigError
from raymoe.placement.metrics import imbalance_of, rank_loads
from raymoe.placement.build import build_plan
from raymoe.placement.replicate import balanced_packing, rebalance_experts, replicate_experts

from tests.paths import EPLB_EXAMPLE as EXAMPLE
from tests.paths import QWEN_LOADS


def test_reproduces_deepseek_worked_example():
    ex = json.loads(EXAMPLE.read_text())
    result = rebalance_experts(np.array(ex["weight"]), ex["num_replicas"], ex["num_groups"], ex["num_nodes"],
                               ex["num_gpus"])
    np.testing.assert_array_equal(result.phy2log, np.array(ex["expected_phy2log"]))
    # the same through the planner's entry point
    plan = build_plan("eplb", num_layers=2, num_experts=12, num_ranks=ex["num_gpus"], num_nodes=ex["num_nodes"],
                      loads=np.array(ex["weight"]), num_redundant=ex["num_replicas"] - 12,
                      num_groups=ex["num_groups"])
    np.testing.assert_array_equal(plan.phy2log, np.array(ex["expected_phy2log"]))


def test_log2phy_and_logcnt_agree_with_phy2log():
    rng = np.random.default_rng(0)
    weight = rng.integers(1, 200, size=(3, 16)).astype(float)
    result = rebalance_experts(weight, 24, None, 1, 4)
    for layer in range(3):
        np.testing.assert_array_equal(np.bincount(result.phy2log[layer], minlength=16), result.logcnt[layer])
        for expert in range(16):
            slots = result.log2phy[layer, expert]
            slots = slots[slots >= 0]
            assert len(slots) == result.logcnt[layer, expert]
            assert (result.phy2log[layer, slots] == expert).all()


def test_replication_goes_to_the_hottest_load_per_replica():
    weight = np.array([[100.0, 10.0, 40.0, 1.0]])
    rep = replicate_experts(weight, 7)
    expected = [1, 1, 1, 1]     # replay the rule by hand: each new slot to the largest load / count
    per_replica = weight[0].copy()
    for _ in range(3):
        hottest = int(np.argmax(per_replica / expected))
        expected[hottest] += 1
    np.testing.assert_array_equal(rep.logcnt[0], expected)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([(8, 2), (12, 4), (16, 4), (16, 8)]), st.integers(0, 3),
       st.floats(0.2, 3.0))
def test_packing_keeps_replicas_on_distinct_ranks(seed, shape, extra_per_rank, skew):
    num_experts, num_ranks = shape
    rng = np.random.default_rng(seed)
    weight = rng.pareto(skew, size=(2, num_experts)) + 1e-3
    slots = num_experts + extra_per_rank * num_ranks
    result = rebalance_experts(weight, slots, None, 1, num_ranks)
    ranks = np.arange(slots) // (slots // num_ranks)
    for layer in range(2):
        pairs = set(zip(result.phy2log[layer].tolist(), ranks.tolist()))
        assert len(pairs) == slots, "two replicas of one expert on one rank"
        assert set(result.phy2log[layer].tolist()) == set(range(num_experts))
    assert result.logcnt.max() <= num_ranks


def test_packing_with_labels_repairs_forced_collision():
    # greedy: 10 -> pack 0, 9 -> pack 1, 8 -> pack 1 (lighter); the last item (a replica of
    # the expert already in pack 0) only has pack 0 left, so an item must be swapped out.
    weight = np.array([[10.0, 9.0, 8.0, 1.0]])
    labels = np.array([[0, 1, 2, 0]])
    packing = balanced_packing(weight, 2, labels)
    packs = packing.pack_index[0]
    assert packs[0] != packs[3]
    assert sorted(np.bincount(packs).tolist()) == [2, 2]


def test_eplb_slot_count_errors_name_the_numbers():
    with pytest.raises(ConfigError, match="not divisible by 8 ranks"):
        rebalance_experts(np.ones((1, 12)), 12, None, 1, 8)
    with pytest.raises(ConfigError) as info:
        build_plan("eplb", num_layers=1, num_experts=4, num_ranks=2, loads=np.ones((1, 4)), num_redundant=6)
    assert info.value.field == "num_replicas"


@pytest.mark.parametrize("ranks,redundant", [(8, 32), (16, 32)])
def test_eplb_balances_qwen3_loads(ranks, redundant):
    loads = np.load(QWEN_LOADS).astype(float)
    linear = build_plan("linear", num_layers=48, num_experts=128, num_ranks=ranks, loads=loads)
    eplb = build_plan("eplb", num_layers=48, num_experts=128, num_ranks=ranks, loads=loads,
                      num_redundant=redundant)
    refined = build_plan("eplb", num_layers=48, num_experts=128, num_ranks=ranks, loads=loads,
                         num_redundant=redundant, refine=True)
    imb = {name: imbalance_of(rank_loads(plan.presence, loads))
           for name, plan in (("linear", linear), ("eplb", eplb), ("refined", refined))}
    assert imb["eplb"].mean() < 1.01 < imb["linear"].mean()
    assert (imb["refined"] <= imb["eplb"] + 1e-12).all()
    assert imb["refined"].max() < 1.002
