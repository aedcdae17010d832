"""The GPU path: the model on CUDA against transformers and the CPU reference engine,
the dispatch collectives on NCCL, and deployments on NCCL against the reference engine.

Skipped where no CUDA device is visible (CI). Run on a lent GPU machine with
``pytest tests/cluster/test_gpu.py``; float32 with TF32 off, so CUDA and CPU differ
only by the order of float additions.
"""

from __future__ import annotations

import pytest
import torch

from raymoe.benchmarks.gpu import engine_on
from raymoe.benchmarks.gpu_nccl import full_stack, round_trip, routed_batch
from raymoe.cluster.config import DeploymentConfigError, parse_config
from raymoe.cluster.coordinator import Deployment
from raymoe.workers.process_group import free_port, join_groups, leave_groups, pick_backend
from raymoe.placement.build import build_plan
from tests.tiny_models import save_tiny_model
from raymoe.workers.dispatch.collectives import Collectives
from raymoe.workers.dispatch.compute import weighted_experts
from raymoe.workers.expert_map import layer_maps
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.sampling import SamplingParams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3")
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3], [60, 61, 62, 63, 9, 8, 70, 71, 72, 3, 4]]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
LOGITS_ATOL = 1e-4  # CUDA vs CPU (or vs a differently summed CUDA path), float32


@pytest.fixture(autouse=True)
def no_tf32():
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        out[family] = (save_tiny_model(family, path, seed=11), path)
    return out


@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_cuda(models, family):
    hf, path = models[family]
    hf = hf.to("cuda")
    ours = load_model(path).to("cuda")
    batch = ForwardBatch.build(PROMPTS, [0] * len(PROMPTS)).to(torch.device("cuda"))
    with torch.no_grad():
        got = ours(batch, all_logits=True)
        for b, prompt in enumerate(PROMPTS):
            want = hf(torch.tensor([prompt], device="cuda")).logits[0]
            diff = (got[batch.seq_index == b] - want).abs().max().item()
            assert diff <= LOGITS_ATOL, f"prompt {b}: max |logits diff| = {diff}"
    hf.to("cpu")


@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_reference_engine_generates_the_cpu_tokens(models, family):
    _, path = models[family]
    cpu = engine_on(path, torch.float32, 4, "cpu").generate_ids(PROMPTS, GREEDY)
    gpu = engine_on(path, torch.float32, 4, "cuda").generate_ids(PROMPTS, GREEDY)
    assert [c.output_ids for c in gpu] == [c.output_ids for c in cpu]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_round_trip_on_nccl_world_one(dtype):
    """One rank is front-end and expert rank: dispatch -> experts -> combine through
    NCCL equals the experts applied directly."""
    groups = join_groups("nccl", f"127.0.0.1:{free_port('127.0.0.1')}", 0, 1, 30.0)
    group = Collectives(groups.expert_parallel)
    try:
        layer_map = layer_maps(build_plan("linear", num_layers=1, num_experts=16, num_ranks=1))[0].to("cuda")
        stack = full_stack(64, 48, dtype, torch.device("cuda"))
        for tokens in (0, 1, 7, 64):
            x, ids, weights = routed_batch(tokens, 64, 0, dtype, torch.device("cuda"))
            got = round_trip(x, ids, weights, layer_map, stack, group, 1)
            want, _ = weighted_experts(x, ids, weights, stack)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    finally:
        leave_groups(groups)


def deployment(path, layout: str, ranks: int, gpus: float, backend: str) -> Deployment:
    config = parse_config({"model": str(path), "layout": layout, "expert_ranks": ranks, "backend": backend,
                           "collective_timeout_s": 60, "batching": {"max_seqs": 4},
                           "resources": {"cpus_per_actor": 0.5, "gpus_per_actor": gpus}})
    return Deployment(config)


def assert_same_steps(ref, dep) -> None:
    """Step both engines together: same tokens, logits within ``LOGITS_ATOL``."""
    for p in PROMPTS:
        assert ref.add_request(p, GREEDY) == dep.add_request(p, GREEDY)
    while ref.has_work() or dep.has_work():
        a, b = ref.step(return_logits=True), dep.step(return_logits=True)
        assert a.tokens == b.tokens
        for rid in a.logits:
            torch.testing.assert_close(b.logits[rid], a.logits[rid], atol=LOGITS_ATOL, rtol=0)


@needs_cuda
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_coherent_one_rank_on_nccl_equals_reference(ray_session, models, family):
    _, path = models[family]
    with deployment(path, "coherent", 1, 1.0, "nccl") as dep:
        assert [w["device"] for w in ray_session.get([a.where.remote() for a in dep.actors])] == ["cuda:0"]
        assert_same_steps(engine_on(path, torch.float32, 4, "cuda"), dep)


@needs_cuda
@pytest.mark.parametrize("layout,ranks", [("disaggregated", 1), ("coherent", 2)])
def test_ranks_sharing_one_gpu_equal_reference_on_gloo(ray_session, models, layout, ranks):
    """Two ranks on one GPU: gloo moves their CUDA tensors (NCCL refuses them, below)."""
    _, path = models["mixtral"]
    with deployment(path, layout, ranks, 0.5, "gloo") as dep:
        assert [w["device"] for w in ray_session.get([a.where.remote() for a in dep.actors])] == ["cuda:0"] * 2
        assert_same_steps(engine_on(path, torch.float32, 4, "cuda"), dep)


@needs_cuda
def test_nccl_on_a_shared_gpu_is_refused_before_any_actor_starts(ray_session, models):
    """NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected",
    NCCL 2.28.9); the coordinator refuses the config first, naming the field."""
    _, path = models["mixtral"]
    with pytest.raises(DeploymentConfigError, match="backend"):
        deployment(path, "disaggregated", 1, 0.5, "nccl")


@pytest.mark.parametrize("requested,gpus,want", [("auto", 1.0, "nccl"), ("auto", 2.0, "nccl"), ("auto", 0.5, "gloo"),
                                                 ("auto", 0.0, "gloo"), ("nccl", 0.5, "nccl"), ("gloo", 1.0, "gloo")])
def test_auto_backend_is_nccl_only_for_whole_gpus(requested, gpus, want):
    assert pick_backend(requested, gpus) == want
