"""The comparison's baselines (benchmarks/baselines/) produce the reference engine's greedy
tokens on a tiny model, and report what they moved. DeepSpeed's only where it installs."""

from __future__ import annotations

import pytest
import torch

from raymoe.benchmarks.baselines import deepspeed_ep
from raymoe.benchmarks.baselines.measure import drive
from raymoe.workers.reference import ReferenceEngine

# Equal lengths: the transformers baseline batches without padding.
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3, 4, 5, 6, 7, 8], [60, 61, 62, 63, 9, 8, 70]]
NEW_TOKENS = 6
HIDDEN, TOP_K, LAYERS = 32, 2, 3


@pytest.fixture(scope="module")
def mixtral(tiny_model):
    return str(tiny_model("mixtral", seed=11))  # 6 experts, top-2, 3 layers


@pytest.fixture(scope="module")
def reference(mixtral):
    torch.set_num_threads(1)
    return drive(ReferenceEngine.from_pretrained(mixtral, max_seqs=4), PROMPTS, NEW_TOKENS).outputs


def test_transformers_generate_equals_reference(ray_session, mixtral, reference):
    from raymoe.benchmarks.baselines.hf_transformers import TransformersSystem

    system = TransformersSystem(mixtral)
    try:
        row = system.run(PROMPTS, NEW_TOKENS)
    finally:
        system.close()
    assert row.outputs == reference
    assert row.decode_steps == NEW_TOKENS - 1 and row.decode_tok_s > 0
    assert row.phase_seconds["experts"] > 0  # the MoE-block hooks fired


def test_naive_ray_equals_reference_and_counts_calls(ray_session, mixtral, reference):
    from raymoe.benchmarks.baselines.naive_ray import NaiveRaySystem

    system = NaiveRaySystem(mixtral, ranks=2, max_seqs=4)
    try:
        row = system.run(PROMPTS, NEW_TOKENS)
        single = system.run(PROMPTS[:1], NEW_TOKENS)
    finally:
        system.close()
    assert row.outputs == reference and single.outputs == reference[:1]
    # one remote call per expert with tokens: between 1 and min(E, B * top-k) per layer
    assert 1 <= row.collectives_per_layer <= 6 and single.collectives_per_layer <= TOP_K
    assert row.bytes_per_token == LAYERS * 2 * TOP_K * HIDDEN * 4  # each (token, expert) row goes out and back
    assert sum(map(sum, row.rank_pairs)) == len(PROMPTS) * (NEW_TOKENS - 1) * TOP_K * LAYERS


def test_deepspeed_router_semantics_are_checked():
    from raymoe.workers.model.config import RouterConfig

    deepspeed_ep.check_router(RouterConfig(num_experts=8, top_k=2, norm_topk_prob=True))  # Mixtral
    deepspeed_ep.check_router(RouterConfig(num_experts=8, top_k=1))  # top-1 keeps the probability
    for bad in (RouterConfig(num_experts=8, top_k=2),  # OLMoE: no renormalisation
                RouterConfig(num_experts=8, top_k=2, norm_topk_prob=True, scoring="sigmoid"),
                RouterConfig(num_experts=8, top_k=2, norm_topk_prob=True, n_group=2, topk_group=1)):
        with pytest.raises(deepspeed_ep.UnsupportedRouterError):
            deepspeed_ep.check_router(bad)


def test_deepspeed_ep_equals_reference(ray_session, mixtral, reference):
    """2 ranks: 3 prompts split 2/1; then 1 prompt, so one rank joins the collectives with zero tokens.
    DeepSpeed is part of the set-up (requirements.lock); without it this fails."""
    assert deepspeed_ep.available() is None, deepspeed_ep.available()
    system = deepspeed_ep.DeepSpeedSystem(mixtral, ranks=2, max_seqs=4)
    try:
        row = system.run(PROMPTS, NEW_TOKENS)
        single = system.run(PROMPTS[:1], NEW_TOKENS)
    finally:
        system.close()
    assert row.outputs == reference and single.outputs == reference[:1]
    for r in (row, single):
        assert r.extra["routing_mismatches"] == 0  # DeepSpeed's gate chose raymoe's experts
        assert r.extra["expert_rows_computed"] >= r.extra["expert_pairs"]  # capacity padding
        # counted where DeepSpeed called torch.distributed: capacity all_reduce + 2 all-to-all
        assert r.collectives_per_layer == 3.0 and r.bytes_per_token > 0
    assert sum(map(sum, row.rank_pairs)) == len(PROMPTS) * (NEW_TOKENS - 1) * TOP_K * LAYERS
