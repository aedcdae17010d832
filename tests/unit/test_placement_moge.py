"""MoGE: grouped routing on a group-per-rank plan balances every batch exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.placement.errors import ConfigError, TraceError
from raymoe.placement.metrics import imbalance_of, per_step_imbalance, rank_loads
from raymoe.placement.moge import check_moge_routing, moge_route
from raymoe.placement.build import build_plan
from raymoe.placement.trace import trace_from_array


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), tokens=st.integers(1, 80), layers=st.integers(1, 4),
       ranks=st.sampled_from([1, 2, 4, 8]), per_group_experts=st.integers(1, 4), per_group_k=st.integers(1, 2),
       groups_per_rank=st.sampled_from([1, 2]), skew=st.floats(0.0, 5.0))
def test_moge_plan_with_moge_routing_has_imbalance_exactly_one(seed, tokens, layers, ranks, per_group_experts,
                                                                per_group_k, groups_per_rank, skew):
    per_group_k = min(per_group_k, per_group_experts)
    groups = ranks * groups_per_rank
    experts, top_k = groups * per_group_experts, groups * per_group_k
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(tokens, layers, experts)) + skew * rng.normal(size=(1, layers, experts))  # skewed
    ids = moge_route(scores, top_k, groups)
    check_moge_routing(ids, experts, groups)
    trace = trace_from_array(ids, experts)
    plan = build_plan("moge", num_layers=layers, num_experts=experts, num_ranks=ranks, trace=trace.stats(),
                      num_groups=groups)
    imbalance = imbalance_of(rank_loads(plan.presence, trace.stats().loads))
    assert (imbalance == 1.0).all()                              # exactly, not approximately
    step = per_step_imbalance(plan.presence, trace, 1)           # every single token is balanced too
    assert step.max == 1.0
    assert plan.objectives["imbalance_max"] == 1.0


def test_non_moge_routing_is_detected_and_bad_groups_refused():
    ids = np.array([[[0, 1]]])            # both picks in group 0 of 2 groups (4 experts)
    with pytest.raises(TraceError, match="per group"):
        check_moge_routing(ids, 4, 2)
    with pytest.raises(ConfigError, match="must divide"):
        build_plan("moge", num_layers=1, num_experts=6, num_ranks=4)
    with pytest.raises(ConfigError, match="multiple of num_ranks"):
        build_plan("moge", num_layers=1, num_experts=6, num_ranks=2, num_groups=3)
