"""benchmarks/cost_model.py: the alpha-beta formula, monotonicity, byte counts that match
the runtime's, and a fit that recovers known parameters from synthetic timings."""

from __future__ import annotations

import numpy as np
import pytest

from raymoe.benchmarks import cost_fit
from raymoe.benchmarks import cost_model as cm
from raymoe.placement import build_plan

SHAPE = cm.Shape(hidden=64, expert_width=96, experts=8, top_k=2, layers=3, heads=4, kv_heads=2, head_dim=16,
                 vocab=128, dtype_bytes=4, context=32)
GPU = cm.Hardware("test GPU", flops=1e14, mem_bw=1e12, gemm_launch_s=4e-6, layer_overhead_s=2e-5,
                  step_overhead_s=3e-4, intra=cm.Link(2e-6, 1 / 4e11), inter=cm.Link(5e-6, 1 / 4e10), gpus_per_node=4,
                  collective_launch_s=8e-6, step_message_s=2e-5, moe_overhead_s=1e-5)


def routing(batch: int, seed: int = 0, experts: int = 8, layers: int = 3, top_k: int = 2) -> np.ndarray:
    """[B, L, A] distinct experts per token."""
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)])
                     for _ in range(batch)])


def linear(ranks: int, experts: int = 8, layers: int = 3):
    return build_plan("linear", num_layers=layers, num_experts=experts, num_ranks=ranks)


def step_seconds(stages, hw=GPU) -> float:
    return sum(cm.price(stages, hw).values())


def test_alpha_beta_formula():
    link = cm.Link(alpha_s=3e-6, beta_s_per_byte=1e-9)
    assert link.time(0) == pytest.approx(3e-6)
    assert link.time(1e6, peers=7) == pytest.approx(7 * 3e-6 + 1e-3)


def test_collective_prices_the_busiest_link_of_each_class():
    node = np.array([0, 0, 1, 1])
    m = np.zeros((4, 4))
    m[0, 1] = 100.0  # inside node 0
    m[0, 2] = 1000.0  # across nodes
    m[3, 2] = 50.0  # inside node 1
    c = cm.Collective("dispatch", m, node)
    assert c.busiest() == (100.0, 1000.0, 1, 2)  # rank 0 sends 100 inside, 1000 across; 1 and 2 peers
    want = GPU.collective_launch_s + max(GPU.intra.time(100.0, 1), GPU.inter.time(1000.0, 2))
    assert cm.stage_time(c, GPU) == pytest.approx(want)
    assert c.total_bytes() == 1150.0


def test_more_tokens_bytes_or_slower_links_never_make_a_step_faster():
    plan, node = linear(4), np.array([0, 0, 0, 1, 1])
    times = [step_seconds(cm.disaggregated(SHAPE, plan, routing(b), 1, node)) for b in (1, 4, 16, 64)]
    assert times == sorted(times)
    slow = cm.Hardware(**{**GPU.__dict__, "inter": cm.Link(5e-6, 1 / 4e9), "mem_bw": 1e11})
    for build in (lambda: cm.disaggregated(SHAPE, plan, routing(16), 1, node),
                  lambda: cm.coherent(SHAPE, plan, routing(16), node[1:]),
                  lambda: cm.deepspeed(SHAPE, routing(16), 4, node[1:])):
        stages = build()
        assert step_seconds(stages, slow) >= step_seconds(stages, GPU)
    small, big = (cm.Collective("combine", np.full((4, 4), n), node[1:]) for n in (10.0, 1e6))
    assert cm.stage_time(big, GPU) > cm.stage_time(small, GPU)


def test_byte_counts_follow_the_runtime_formulas():
    """docs/layouts.md: disaggregated, fixed capacity: R * T rows of (D*dtype + 8A) out and
    R * T rows of D*dtype back per layer, no metadata; DeepSpeed 2 (R-1) E C D dtype + R(R-1) 8
    per layer."""
    batch, ranks = 16, 4
    r = routing(batch)
    plan = linear(ranks)
    d = SHAPE.hidden * SHAPE.dtype_bytes
    want = SHAPE.layers * ranks * batch * ((d + 8 * SHAPE.top_k) + d)
    assert cm.bytes_moved(cm.disaggregated(SHAPE, plan, r, 1, np.zeros(ranks + 1, int))) == want
    share = np.arange(batch) % ranks
    capacity = [max(np.sum((share == q)[:, None] & (r[:, l] == e)) for q in range(ranks) for e in range(8))
                for l in range(SHAPE.layers)]
    want = sum(2 * (ranks - 1) * 8 * c * d + ranks * (ranks - 1) * 8 for c in capacity)
    assert cm.bytes_moved(cm.deepspeed(SHAPE, r, ranks, np.zeros(ranks, int))) == want


def test_coherent_tokens_whose_experts_share_a_rank_move_nothing():
    """Top-1, every token routed to experts of rank 0 at every layer: after the first
    layer's (empty) merge nothing is dispatched; only the KV rows are all-gathered."""
    shape = cm.Shape(**{**SHAPE.__dict__, "top_k": 1})
    r = np.zeros((8, 3, 1), dtype=int)  # expert 0 lives on rank 0 (linear)
    stages = cm.coherent(shape, linear(4), r, np.zeros(4, int))
    moved = {s.phase: 0.0 for s in stages}
    for s in stages:
        if isinstance(s, cm.Collective):
            moved[s.phase] += s.total_bytes()
    assert moved["dispatch"] == 4 * 3 * 2 * 8  # metadata only: R(R-1) int64 at layers 1 and 2
    in_band = cm.coherent(shape, linear(4), r, np.zeros(4, int), in_band_counts=True)
    collectives = [s for s in in_band if isinstance(s, cm.Collective) and s.phase == "dispatch"]
    assert len(collectives) == 2 and sum(s.total_bytes() for s in collectives) == 4 * 3 * 2 * 8  # counts, in-band
    assert moved["coherence"] == 8 * 2 * (shape.kv_row_bytes + 12) * 3 + 4 * 3 * 8  # rows of layers 1, 2 to 3 peers


def test_nnls_matches_a_projected_gradient_solution():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 6)), rng.normal(size=30)
    x = cost_fit.nnls(a, b)
    y = np.zeros(6)
    step = 1 / np.linalg.norm(a, 2) ** 2
    for _ in range(20000):
        y = np.maximum(0, y - step * a.T @ (a @ y - b))
    assert (x >= 0).all()
    assert np.linalg.norm(a @ x - b) == pytest.approx(np.linalg.norm(a @ y - b), rel=1e-6)


def test_fit_recovers_known_parameters_from_synthetic_timings():
    """Timings made by pricing real layout stages with known CPU parameters (one node, sum
    roofline) are fitted back to those parameters."""
    truth = cm.Hardware("truth", flops=3e10, mem_bw=8e9, gemm_launch_s=6e-5, layer_overhead_s=9e-4,
                        step_overhead_s=2e-3, intra=cm.Link(4e-4, 3e-9), inter=cm.Link(4e-4, 3e-9),
                        gpus_per_node=1 << 20, roofline="sum", collective_launch_s=1e-4, step_message_s=5e-4,
                        moe_overhead_s=3e-4)
    a, b = [], []
    for ranks in (1, 2, 4):
        plan = linear(ranks)
        for batch in (1, 3, 8, 32):
            for stages in (cm.disaggregated(SHAPE, plan, routing(batch, seed=batch), 1, np.zeros(ranks + 1, int)),
                           cm.coherent(SHAPE, plan, routing(batch, seed=batch + 1), np.zeros(ranks, int)),
                           cm.deepspeed(SHAPE, routing(batch, seed=batch + 2), ranks, np.zeros(ranks, int))):
                f, t = cm.features(stages, truth), cm.price(stages, truth)
                for phase in cm.PHASES:
                    if f[phase].any():
                        a.append(f[phase])
                        b.append(t[phase])
    theta = cost_fit.fit(np.array(a), np.array(b))
    np.testing.assert_allclose(theta, truth.theta(), rtol=1e-6)
    fitted = cm.Hardware.from_theta(theta)
    assert fitted.flops == pytest.approx(truth.flops) and fitted.intra.alpha_s == pytest.approx(4e-4)


def test_projection_covers_every_layout_and_policy(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "loads.npy", rng.integers(1, 50, size=(3, 8)).astype(float))
    config = {"model": SHAPE.__dict__, "projection": {
        "loads": str(tmp_path / "loads.npy"), "affinity": 0.3, "trace_tokens": 512, "batch_per_gpu": 4, "steps": 2,
        "gpus": [4, 8], "layouts": ["disaggregated", "coherent", "deepspeed"],
        "policies": ["linear", "round_robin", "eplb", "affinity"], "frontend_fractions": [0.25, 0.5],
        "affinity_time_limit_s": 0.3}}
    rows = cm.project(config, GPU)
    assert [(r["gpus"], r["nodes"]) for r in rows] == [(4, 1)] * 9 + [(8, 2)] * 9
    assert {r["layout"] for r in rows} == {"disaggregated", "coherent", "deepspeed"}
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["step_ms"] == pytest.approx(sum(r["phase_ms"].values()))
        assert r["frontends"] > 0 if r["layout"] == "disaggregated" else r["frontends"] == 0
