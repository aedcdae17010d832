"""The coherent layout (ExFlow) against the reference engine, token for token, and its
traffic: tokens move only to where their experts are."""

from __future__ import annotations

import numpy as np
import pytest

from raymoe.cluster.config import parse_config
from raymoe.cluster.coordinator import Deployment
from raymoe.placement import build_plan, load_trace
from tests.cluster.test_runtime import LATE, PROMPTS, SHARED, lockstep, paged, paged_reference
from tests.plans import random_plan
from tests.tiny_models import save_planted_affinity_model
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

MIXED = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (4, 9, 6)]  # finish at different steps


@pytest.fixture(scope="module")
def models(tiny_model):
    return {name: tiny_model(family, seed=5, **overrides) for name, family, overrides in (
        ("top2", "mixtral", {}), ("top1", "mixtral", {"num_experts_per_tok": 1}), ("qwen2", "qwen2_moe", {}))}


def coherent(path, ranks: int, plan=None, **overrides) -> Deployment:
    config = parse_config({"model": str(path), "layout": "coherent", "expert_ranks": ranks,
                           "resources": {"cpus_per_actor": 0.1}, "batching": {"max_seqs": 4}, **overrides})
    return Deployment(config, plan)


def lockstep_mixed(ref, dep) -> int:
    """Prompts of different lengths finishing at different steps, plus late arrivals."""
    for p, params in zip(PROMPTS, MIXED):
        assert ref.add_request(p, params) == dep.add_request(p, params)
    return lockstep(ref, dep, prompts=[], late=LATE)


@pytest.mark.parametrize("model,ranks,policy,kv", [
    ("top1", 2, "linear", "default"), ("top1", 4, "round_robin", "default"), ("top2", 3, "linear", "default"),
    ("qwen2", 2, "linear", "paged")])
def test_coherent_equals_reference(ray_session, models, model, ranks, policy, kv):
    """``paged``: every rank's cache follows the same block tables through preemption,
    chunked prefill and prefix hits (``tests/cluster/test_runtime.py::paged``)."""
    path = models[model]
    if kv == "paged":
        ref = paged_reference(path)
        with coherent(path, ranks, placement={"policy": policy}, batching=paged(path)) as dep:
            assert lockstep(ref, dep, late=SHARED) > 10
            stats = dep.scheduler.stats
            assert stats.preemptions > 0 and stats.hit >= 16 and stats == ref.scheduler.stats
            _check_traffic(dep, model, ranks)
        return
    ref = ReferenceEngine.from_pretrained(path, max_seqs=4)
    with coherent(path, ranks, placement={"policy": policy}) as dep:
        assert lockstep_mixed(ref, dep) >= 9
        _check_traffic(dep, model, ranks)


def _check_traffic(dep, model: str, ranks: int) -> None:
    for step in dep.stats.per_step:
        assert step.messages == ranks
        first, *rest = step.layers
        top_k = 1 if model == "top1" else 2
        # the first MoE layer: every rank holds every token, so only top-k merging communicates
        assert (first.token_collectives, first.metadata_collectives, first.dispatch_bytes) == (top_k - 1, 0, 0)
        # later layers: one dispatch all-to-all (+ one merge with top-2), no metadata (fixed capacity)
        assert all((L.token_collectives, L.metadata_collectives) == (top_k, 0) for L in rest)
        if top_k == 1:
            assert all(L.merge_bytes == 0 for L in step.layers)


def test_coherent_with_replicated_experts(ray_session, models):
    plan = random_plan(6, 3, 2, seed=7, layers=3)
    ref = ReferenceEngine.from_pretrained(models["top2"], max_seqs=4)
    with coherent(models["top2"], 3, plan) as dep:
        lockstep_mixed(ref, dep)


def test_planted_affinity_moves_no_token(ray_session, tmp_path):
    """Record a trace, fit an affinity plan on it, redeploy: no token leaves its rank."""
    perms = save_planted_affinity_model(tmp_path / "model")
    ref = ReferenceEngine.from_pretrained(tmp_path / "model", max_seqs=8)
    ref.record_trace()
    prompts = [[(7 * i + j) % 64 for j in range(3 + i % 5)] for i in range(12)]
    ref.generate_ids(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    ref.save_trace(tmp_path / "trace.npz")
    ids = np.load(tmp_path / "trace.npz")["topk_ids"][:, :, 0]
    for layer in range(1, 3):  # the routing really is planted
        assert (ids[:, layer] == np.asarray(perms[layer])[ids[:, 0]]).all()
    trace = load_trace(tmp_path / "trace.npz")
    plan = build_plan("affinity", num_layers=3, num_experts=4, num_ranks=2, trace=trace)
    assert plan.objectives["cross_device_fraction"] == 0.0
    linear = build_plan("linear", num_layers=3, num_experts=4, num_ranks=2)
    moved = {}
    for name, p in (("affinity", plan), ("linear", linear)):
        with coherent(tmp_path / "model", 2, p, batching={"max_seqs": 8}) as dep:
            lockstep(ReferenceEngine.from_pretrained(tmp_path / "model", max_seqs=8), dep, prompts=prompts[:6], late={})
            totals = dep.stats.totals()["layers"]
            moved[name] = sum(L["dispatch_bytes"] + L["merge_bytes"] for L in totals)
            stayed = [L["stayed_tokens"] / L["hosted_tokens"] for L in totals]
        if name == "affinity":
            assert moved[name] == 0 and stayed == [1.0, 1.0, 1.0]
    assert moved["linear"] > 0
