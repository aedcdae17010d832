"""The affinity policy: planted structure is found, load caps are met or refused with a bound."""

from __future__ import annotations

import time

import numpy as np
import pytest

from raymoe.placement.errors import ConfigError, LoadCapInfeasible
from raymoe.placement.metrics import coactivation_split_fraction, cross_device_fraction, imbalance_of, rank_loads
from raymoe.placement.build import build_plan
from raymoe.placement.synthetic import planted_affinity_trace
from raymoe.placement.trace import trace_from_array


@pytest.mark.parametrize("top_k,solver,shape", [
    (1, "heuristic", (16, 6, 4)),
    (2, "heuristic", (16, 6, 4)),
    (1, "heuristic", (64, 8, 8)),
    (1, "exact", (8, 4, 2)),
])
def test_planted_affinity_is_solved_to_zero_cross_device(top_k, solver, shape):
    experts, layers, ranks = shape
    trace, perms = planted_affinity_trace(400, layers, experts, top_k, seed=experts + top_k)
    stats = trace.stats()
    linear = build_plan("linear", num_layers=layers, num_experts=experts, num_ranks=ranks, trace=stats)
    plan = build_plan("affinity", num_layers=layers, num_experts=experts, num_ranks=ranks, trace=stats,
                      solver=solver, coactivation_weight=0.0)
    assert cross_device_fraction(linear.presence, stats.transitions) > 0.3
    if top_k == 1:
        assert plan.objectives["cross_device_fraction"] == pytest.approx(0.0, abs=1e-12)
    else:   # pairs (i at l, j' at l+1) of two different experts stay local only if i, i' share a rank
        kept = 1.0 - plan.objectives["cross_device_fraction"]
        assert kept >= 1.0 / top_k - 1e-9
    for layer in range(layers - 1):   # every expert's successor sits on its rank
        for expert in range(experts):
            assert set(plan.slot2rank[layer, plan.phy2log[layer] == expert]) == \
                set(plan.slot2rank[layer + 1, plan.phy2log[layer + 1] == perms[layer][expert]])


def test_planted_affinity_with_replicas_and_load_cap():
    trace, _ = planted_affinity_trace(600, 4, 8, 1, seed=3)
    stats = trace.stats()
    plan = build_plan("affinity", num_layers=4, num_experts=8, num_ranks=4, trace=stats, num_redundant=4,
                      load_cap=1.3, solver="heuristic")
    assert plan.logcnt.max() >= 2, "hot experts are replicated"
    assert plan.objectives["cross_device_fraction"] == pytest.approx(0.0, abs=1e-12)
    assert plan.objectives["imbalance_max"] <= 1.3 + 1e-9


def test_hierarchical_puts_affinity_inside_nodes_first():
    trace, _ = planted_affinity_trace(500, 5, 16, 1, seed=5)
    stats = trace.stats()
    plan = build_plan("affinity", num_layers=5, num_experts=16, num_ranks=8, num_nodes=2, trace=stats,
                      num_redundant=4, solver="heuristic")
    assert plan.params["hierarchical"] is True
    assert plan.objectives["inter_node_fraction"] == pytest.approx(0.0, abs=1e-12)
    assert plan.objectives["inter_node_fraction"] <= plan.objectives["cross_device_fraction"]
    node = plan.slot2rank // 4
    for layer in range(5):   # replicas stay in the node of their expert
        for expert in range(16):
            assert len(set(node[layer, plan.phy2log[layer] == expert].tolist())) == 1


def test_coactivation_keeps_experts_chosen_together_on_one_rank():
    rng = np.random.default_rng(0)
    pairs = rng.permutation(8).reshape(4, 2)           # experts always chosen in these pairs
    ids = np.stack([[pairs[rng.integers(4)] for _ in range(3)] for _ in range(200)])
    stats = trace_from_array(ids, 8).stats()
    plan = build_plan("affinity", num_layers=3, num_experts=8, num_ranks=4, trace=stats,
                      coactivation_weight=1.0, solver="heuristic")
    assert coactivation_split_fraction(plan.presence, stats.coactivation) == pytest.approx(0.0, abs=1e-12)
    linear = build_plan("linear", num_layers=3, num_experts=8, num_ranks=4, trace=stats)
    assert coactivation_split_fraction(linear.presence, stats.coactivation) > 0.5


def test_affinity_meets_load_cap_on_skewed_loads():
    trace, _ = planted_affinity_trace(2000, 4, 32, 2, seed=9)
    stats = trace.stats()
    with pytest.raises(LoadCapInfeasible) as info:   # the hottest expert alone exceeds the cap
        build_plan("affinity", num_layers=4, num_experts=32, num_ranks=4, trace=stats, load_cap=1.05)
    assert info.value.proven and info.value.lower_bound > 1.05
    plan = build_plan("affinity", num_layers=4, num_experts=32, num_ranks=4, trace=stats, load_cap=1.05,
                      num_redundant=8, solver="heuristic")
    assert imbalance_of(rank_loads(plan.presence, stats.loads)).max() <= 1.05 + 1e-9
    linear = build_plan("linear", num_layers=4, num_experts=32, num_ranks=4, trace=stats)
    assert plan.objectives["cross_device_fraction"] < linear.objectives["cross_device_fraction"]


def test_impossible_load_cap_reports_the_hottest_expert_bound():
    loads = np.array([[100.0, 1.0, 1.0, 1.0], [25.0, 25.0, 25.0, 28.0]])
    with pytest.raises(LoadCapInfeasible) as info:
        build_plan("affinity", num_layers=2, num_experts=4, num_ranks=2, loads=loads, load_cap=1.2)
    err = info.value
    mean = loads[0].sum() / 2
    assert err.proven and err.layer == 0
    assert err.lower_bound == pytest.approx((100.0 + 1.0) / mean)   # hottest + the smallest slot beside it
    assert "1.2" in str(err) and f"{err.lower_bound:.6f}" in str(err)
    # with replicas of the hot expert the bound drops and the cap becomes reachable
    plan = build_plan("affinity", num_layers=2, num_experts=4, num_ranks=2, loads=loads, load_cap=1.2,
                      num_redundant=2)
    assert plan.objectives["imbalance_max"] <= 1.2


def test_other_policies_never_silently_violate_a_cap():
    loads = np.array([[50.0, 1.0, 1.0, 1.0]])
    with pytest.raises(LoadCapInfeasible) as info:
        build_plan("linear", num_layers=1, num_experts=4, num_ranks=2, loads=loads, load_cap=1.1)
    assert info.value.best_found == pytest.approx(51.0 / 26.5)
    with pytest.raises(LoadCapInfeasible, match="at least 1"):
        build_plan("eplb", num_layers=1, num_experts=4, num_ranks=2, loads=loads, load_cap=0.9)


def test_more_ranks_than_slots_and_unknown_options_are_config_errors():
    with pytest.raises(ConfigError) as info:
        build_plan("affinity", num_layers=2, num_experts=4, num_ranks=6, loads=np.ones((2, 4)))
    assert info.value.field == "num_ranks" and info.value.value == 6 and "4 experts" in str(info.value)
    with pytest.raises(ConfigError, match="not accepted"):
        build_plan("linear", num_layers=2, num_experts=4, num_ranks=2, solver="exact")
    with pytest.raises(ConfigError, match="unknown policy"):
        build_plan("random", num_layers=2, num_experts=4, num_ranks=2)
    with pytest.raises(ConfigError, match="divisible by 2 nodes"):
        build_plan("affinity", num_layers=2, num_experts=6, num_ranks=4, num_nodes=2,
                   loads=np.ones((2, 6)), num_redundant=1)


@pytest.mark.slow
def test_heuristic_solves_qwen_sized_instance_in_time():
    """128 experts x 48 layers x 16 ranks, top-8, load cap 1.05 + 32 replicas: < 30 s of
    CPU time (the target is wall time on 2 cores; CPU time does not depend on other load)."""
    from raymoe.placement.synthetic import skewed_markov_trace
    from tests.paths import QWEN_LOADS

    stats = skewed_markov_trace(np.load(QWEN_LOADS).astype(float), 4000, 8, 0.3, seed=1).stats()
    start = time.process_time()
    plan = build_plan("affinity", num_layers=48, num_experts=128, num_ranks=16, trace=stats, num_redundant=32,
                      load_cap=1.05, solver="heuristic")
    assert time.process_time() - start < 30.0
    assert plan.objectives["imbalance_max"] <= 1.05 + 1e-9
    linear = build_plan("linear", num_layers=48, num_experts=128, num_ranks=16, trace=stats)
    assert plan.objectives["cross_device_fraction"] < linear.objectives["cross_device_fraction"]
