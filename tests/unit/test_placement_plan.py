"""Plans of every policy are valid (property tests), YAML round-trips, bad plans are refused."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from raymoe.placement.affinity import slot_capacity
from raymoe.placement.errors import PlanError
from raymoe.placement.build import build_plan
from raymoe.placement.plan import PlacementPlan
from raymoe.placement.trace import trace_from_array


def check_invariants(plan: PlacementPlan, num_experts: int, num_ranks: int, num_slots: int) -> None:
    """The plan contract, checked from the raw maps (not through ``validate``)."""
    assert plan.phy2log.shape == plan.slot2rank.shape == (plan.num_layers, num_slots)
    for layer in range(plan.num_layers):
        p2l, s2r = plan.phy2log[layer], plan.slot2rank[layer]
        assert set(p2l.tolist()) == set(range(num_experts)), "every logical expert has >= 1 slot"
        pairs = list(zip(p2l.tolist(), s2r.tolist()))
        assert len(set(pairs)) == len(pairs), "replicas never on the same rank twice"
        counts = np.bincount(s2r, minlength=num_ranks)
        assert sorted(counts.tolist()) == sorted(slot_capacity(num_slots, num_ranks).tolist()), "slot counts"
        # maps consistent: phy2log[log2phy] == id, every slot listed exactly once
        listed = []
        for expert in range(num_experts):
            slots = plan.log2phy[layer, expert]
            slots = slots[slots >= 0]
            assert (p2l[slots] == expert).all()
            assert len(slots) == plan.logcnt[layer, expert]
            listed += slots.tolist()
        assert sorted(listed) == list(range(num_slots))
        for rank in range(num_ranks):
            assert sorted(plan.rank_experts(layer, rank).tolist()) == sorted(p2l[s2r == rank].tolist())


def random_trace(seed: int, num_layers: int, num_experts: int, top_k: int, tokens: int = 60):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(num_experts, 0.5))
    ids = np.stack([[rng.choice(num_experts, top_k, replace=False, p=p) for _ in range(num_layers)]
                    for _ in range(tokens)])
    return trace_from_array(ids, num_experts)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(["linear", "round_robin", "eplb", "affinity"]), seed=st.integers(0, 10**6),
       num_experts=st.integers(2, 12), num_ranks=st.integers(1, 6), num_layers=st.integers(1, 4),
       top_k=st.integers(1, 2), redundant=st.integers(0, 6), num_nodes=st.sampled_from([1, 2]))
def test_every_policy_gives_a_valid_plan(policy, seed, num_experts, num_ranks, num_layers, top_k, redundant,
                                         num_nodes, tmp_path_factory):
    assume(num_ranks <= num_experts and top_k <= num_experts and num_ranks % num_nodes == 0)
    if policy == "affinity" and num_nodes > 1:       # hierarchical: experts and replicas split over nodes
        assume(num_experts % num_nodes == 0)
        redundant -= redundant % num_nodes
    if policy in ("linear", "round_robin"):
        redundant = 0
    if policy == "eplb":
        redundant += -(num_experts + redundant) % num_ranks      # EPLB packs equal slot counts
    assume(redundant <= num_experts * (num_ranks - 1))
    if policy == "affinity" and num_nodes > 1:       # and the same bound within each node
        assume(redundant // num_nodes <= num_experts // num_nodes * (num_ranks // num_nodes - 1))
    stats = random_trace(seed, num_layers, num_experts, top_k).stats()
    options = {"solver": "heuristic"} if policy == "affinity" else {}
    plan = build_plan(policy, num_layers=num_layers, num_experts=num_experts, num_ranks=num_ranks,
                      num_nodes=num_nodes, trace=stats, num_redundant=redundant, **options)
    check_invariants(plan, num_experts, num_ranks, num_experts + redundant)
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    plan.save(path)
    loaded = PlacementPlan.load(path)
    np.testing.assert_array_equal(loaded.phy2log, plan.phy2log)
    np.testing.assert_array_equal(loaded.slot2rank, plan.slot2rank)
    assert loaded.policy == policy and loaded.params == plan.params
    assert loaded.objectives == pytest.approx(plan.objectives)


@pytest.mark.parametrize("num_experts,num_ranks", [(10, 4), (7, 3), (8, 8), (5, 1)])
def test_baselines_for_uneven_expert_counts(num_experts, num_ranks):
    linear = build_plan("linear", num_layers=2, num_experts=num_experts, num_ranks=num_ranks)
    robin = build_plan("round_robin", num_layers=2, num_experts=num_experts, num_ranks=num_ranks)
    for plan in (linear, robin):
        check_invariants(plan, num_experts, num_ranks, num_experts)
    extra = num_experts % num_ranks
    for rank in range(num_ranks):
        size = num_experts // num_ranks + (rank < extra)
        start = rank * (num_experts // num_ranks) + min(rank, extra)
        assert linear.rank_experts(0, rank).tolist() == list(range(start, start + size))
        assert robin.rank_experts(1, rank).tolist() == list(range(rank, num_experts, num_ranks))


def _doc(plan: PlacementPlan, tmp_path) -> dict:
    plan.save(tmp_path / "p.yaml")
    return yaml.safe_load((tmp_path / "p.yaml").read_text())


def _write(doc: dict, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("slot2rank"), "slot2rank"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["phy2log"][0].__setitem__(0, 99), "phy2log[0, 0]"),
    (lambda d: d["slot2rank"][1].__setitem__(2, -1), "slot2rank[1, 2]"),
    (lambda d: d["phy2log"][0].pop(), "phy2log"),
    (lambda d: d["phy2log"][0].__setitem__(1, d["phy2log"][0][0]), "phy2log[0]"),
    (lambda d: d.update(num_nodes=3), "num_nodes"),
    (lambda d: d.update(num_layers=5), "num_layers"),
])
def test_load_refuses_bad_plans_naming_the_field(mutate, field, tmp_path):
    doc = _doc(build_plan("linear", num_layers=2, num_experts=8, num_ranks=4), tmp_path)
    mutate(doc)
    with pytest.raises(PlanError) as info:
        PlacementPlan.load(_write(doc, tmp_path))
    assert info.value.field == field
    assert isinstance(info.value, ValueError) and "Fix:" in str(info.value)


def test_validate_refuses_two_replicas_on_one_rank_and_uneven_slots():
    p2l = np.array([[0, 1, 0, 2]])
    with pytest.raises(PlanError, match="distinct ranks"):
        PlacementPlan(2, 1, 3, p2l, np.array([[0, 0, 0, 1]]), "custom", {}, {})
    with pytest.raises(PlanError, match="differ by more than one"):
        PlacementPlan(2, 1, 3, p2l, np.array([[0, 0, 1, 0]]), "custom", {}, {})
    with pytest.raises(PlanError, match="differ from layer 0"):
        PlacementPlan(2, 1, 2, np.array([[0, 1, 0], [0, 1, 1]]), np.array([[0, 1, 1], [0, 0, 1]]), "custom", {}, {})
    with pytest.raises(PlanError, match="has no slot"):
        PlacementPlan(3, 1, 2, np.array([[0, 1]]), np.array([[0, 1]]), "custom", {}, {})
