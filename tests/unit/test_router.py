"""Router semantics that have no transformers reference: MoGE grouped routing."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.workers.model.config import RouterConfig
from raymoe.workers.model.router import select_experts


@st.composite
def moge_cases(draw):
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    per_group = draw(st.integers(1, 6))
    k_per_group = draw(st.integers(1, per_group))
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    tokens = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    cfg = RouterConfig(num_experts=groups * per_group, top_k=groups * k_per_group, scoring=scoring,
                       norm_topk_prob=draw(st.booleans()), moge_groups=groups,
                       correction_bias=scoring == "sigmoid")
    return cfg, tokens, seed


@settings(max_examples=60, deadline=None)
@given(moge_cases())
def test_moge_takes_k_over_g_experts_in_every_group(case):
    cfg, tokens, seed = case
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, cfg.num_experts, generator=g)
    bias = torch.randn(cfg.num_experts, generator=g) * 0.1
    routing = select_experts(logits, cfg, bias)
    per_group = cfg.num_experts // cfg.moge_groups
    group_of = routing.topk_ids // per_group  # [T, A]
    counts = torch.stack([(group_of == grp).sum(1) for grp in range(cfg.moge_groups)], 1)
    assert (counts == cfg.top_k // cfg.moge_groups).all()
    assert all(len(set(row)) == cfg.top_k for row in routing.topk_ids.tolist())  # distinct experts
    # within each group the chosen experts are the group's best by (biased) score
    scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores + bias if cfg.correction_bias else scores
    for grp in range(cfg.moge_groups):
        block = choice[:, grp * per_group:(grp + 1) * per_group]
        kth = block.topk(cfg.top_k // cfg.moge_groups, dim=1).values[:, -1:]
        chosen = routing.topk_ids[group_of == grp].view(tokens, -1)
        assert (choice.gather(1, chosen) >= kth).all()


def test_moge_gives_every_group_the_same_load():
    """The balancing property: with G groups on G ranks, every rank gets T * K / G tokens."""
    cfg = RouterConfig(num_experts=16, top_k=4, moge_groups=4)
    routing = select_experts(torch.randn(1000, 16), cfg)
    loads = torch.bincount(routing.topk_ids.flatten() // 4, minlength=4)
    assert loads.tolist() == [1000] * 4


def test_weights_renormalised_and_scaled():
    cfg = RouterConfig(num_experts=8, top_k=2, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    routing = select_experts(torch.randn(10, 8), cfg)
    assert torch.allclose(routing.topk_weights.sum(-1), torch.full((10,), 2.5))
