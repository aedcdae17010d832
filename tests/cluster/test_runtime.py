"""The distributed runtime against the reference engine, token for token, on a real
local Ray instance with real gloo collectives."""

from __future__ import annotations

import os
import re
import shutil
import socket
import time

import pytest
import ray
import torch

from raymoe.cluster.config import DeploymentConfigError, parse_config
from raymoe.cluster.coordinator import Deployment
from tests.plans import linear_plan, random_plan
from tests.tiny_models import fp8_checkpoint
from tests.tiny_models import save_char_tokenizer, save_tiny_model
from raymoe.workers.engine import Engine
from raymoe.workers.model.attention import cache_shapes
from raymoe.workers.model.checkpoint import Checkpoint
from raymoe.workers.model.kv_cache import token_bytes
from raymoe.workers.model.errors import CheckpointError
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3], [60, 61, 62, 63, 9, 8, 70, 71, 72, 3, 4]]
LATE = {2: [[44, 45, 46]], 5: [[7, 7, 8, 9, 10, 11]]}  # step -> prompts that arrive then
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tiny_model):
    return {family: tiny_model(family, seed=11) for family in ("mixtral", "qwen2_moe", "deepseek_v3")}


def deployment(path, ranks: int, plan=None, **overrides) -> Deployment:
    config = parse_config({"model": str(path), "expert_ranks": ranks, "resources": {"cpus_per_actor": 0.1},
                           "batching": {"max_seqs": 4}, **overrides})
    return Deployment(config, plan)


def lockstep(ref: Engine, dep: Engine, prompts=PROMPTS, late=LATE, params=GREEDY) -> int:
    """Drive both engines with the same requests, the late ones arriving mid-decode;
    every step's sampled logits must agree. Returns the number of steps."""
    for p in prompts:
        assert ref.add_request(p, params) == dep.add_request(p, params)
    done_ref, done_dep, steps = {}, {}, 0
    while ref.has_work() or dep.has_work():
        for p in late.get(steps, []):
            ref.add_request(p, params)
            dep.add_request(p, params)
        a, b = ref.step(return_logits=True), dep.step(return_logits=True)
        assert a.logits.keys() == b.logits.keys() and a.tokens == b.tokens
        for rid in a.logits:
            torch.testing.assert_close(b.logits[rid], a.logits[rid], atol=1e-5, rtol=0)
        done_ref.update({c.request_id: c.output_ids for c in a.finished})
        done_dep.update({c.request_id: c.output_ids for c in b.finished})
        steps += 1
    # requests added before the call finish here too
    assert done_dep == done_ref and len(done_ref) >= len(prompts) + sum(map(len, late.values()))
    return steps


def paged(path) -> dict:
    """A ``batching`` section that exercises the paged KV cache in a few steps: 4-token
    blocks, a pool of 12 (4 sequences of up to 21 tokens need 24: preemption), steps of 8
    tokens (every prompt but the shortest is chunked), prefix caching."""
    per_token = token_bytes(cache_shapes(Checkpoint(path).config), torch.float32)
    return {"max_seqs": 4, "max_seq_len": 48, "block_size": 4, "max_num_batched_tokens": 8,
            "kv_cache_memory": 12 * 4 * per_token, "prefix_caching": True}


def paged_reference(path) -> ReferenceEngine:
    b = paged(path)
    return ReferenceEngine.from_pretrained(path, max_seqs=4, max_seq_len=48, block_size=4, max_num_batched_tokens=8,
                                           kv_cache_memory=b["kv_cache_memory"])


# late arrivals that start with the first 8 tokens of PROMPTS[2] (2 blocks, cached by then)
SHARED = {**LATE, 9: [PROMPTS[2][:8] + [1, 2]], 11: [PROMPTS[2][:9] + [9]]}


@pytest.mark.parametrize("ranks, kv", [(1, "default"), (2, "paged"), (4, "default")])
def test_mixtral_equals_reference_for_any_rank_count(ray_session, models, ranks, kv):
    """6 experts: 4 ranks do not divide them (2/2/1/1 slots). 3 ranks: the counting test below.
    ``paged``: a small pool (preemption), chunked prefill and prefix hits, in lockstep."""
    path = models["mixtral"]
    ref = ReferenceEngine.from_pretrained(path, max_seqs=4) if kv == "default" else paged_reference(path)
    batching = {"batching": paged(path)} if kv == "paged" else {}
    with deployment(path, ranks, linear_plan(6, ranks, 3), **batching) as dep:
        assert dep.dtype == "float32"  # dtype auto on CPU actors (tests/unit/test_dtypes.py)
        assert lockstep(ref, dep, late=SHARED if kv == "paged" else LATE) > 10
        if kv == "paged":
            stats = dep.scheduler.stats
            assert stats.preemptions > 0 and stats.hit >= 16 and stats == ref.scheduler.stats


def test_an_fp8_checkpoint_runs_distributed_as_in_one_process(ray_session, models, tmp_path):
    """FP8 block-quantized weights (tests/unit/test_fp8_checkpoint.py): the expert ranks
    dequantize only their own slots, and the deployment equals the reference engine."""
    fp8, _, _ = fp8_checkpoint(models["mixtral"], tmp_path / "fp8", (16, 24))
    ref = ReferenceEngine.from_pretrained(fp8, max_seqs=4)
    with deployment(fp8, 2, linear_plan(6, 2, 3)) as dep:
        assert lockstep(ref, dep) > 10


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_experts_run_distributed_as_in_one_process(ray_session, tiny_model, mode):
    """quantization.experts: the expert ranks quantize their own slots at load as the
    reference engine quantizes all of them, and compute the same bits."""
    path = tiny_model("mixtral", seed=11, intermediate_size=64)  # int4 groups of 32 need I % 32 == 0
    ref = ReferenceEngine.from_pretrained(path, expert_quantization=(mode, 32), max_seqs=4)
    with deployment(path, 2, linear_plan(6, 2, 3), quantization={"experts": mode, "group_size": 32}) as dep:
        assert lockstep(ref, dep) > 10
        with pytest.raises(DeploymentConfigError, match="quantization.experts"):
            dep.set_plan(random_plan(6, 2, 0, seed=1, layers=3))  # live moves carry float weights: refused


@pytest.mark.parametrize("layout", ["disaggregated", "coherent"])
def test_penalties_bias_and_min_tokens_sample_as_in_one_process(ray_session, models, layout, tmp_path):
    """The sampler's processors get what they need in the step message: the deployment
    (front-end, or every coherent rank) samples exactly the reference engine's tokens
    (greedy and seeded), scores them the same (logprobs, 1e-5), and masks them the same
    (structured output: the model gets a character tokenizer for it)."""
    path = tmp_path / "mixtral"
    shutil.copytree(models["mixtral"], path)
    save_char_tokenizer(path)
    ref = ReferenceEngine.from_pretrained(path, max_seqs=4)
    params = [SamplingParams(max_new_tokens=12, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.4,
                             logprobs=3, prompt_logprobs=2),
              SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, min_p=0.1, repetition_penalty=2.0,
                             logit_bias=((7, 3.0),), logprobs=0),
              SamplingParams(max_new_tokens=12, min_tokens=6, stop_token_ids=(7,), logit_bias=((7, 50.0),)),
              SamplingParams(max_new_tokens=12, temperature=1.0, seed=2, guide=("regex", "[a-f]{3}-[0-9]{2}"))]
    prompts = PROMPTS + PROMPTS[:1]
    with deployment(path, 2, linear_plan(6, 2, 3), layout=layout) as dep:
        got = [dep.generate_ids([p], [sp])[0] for p, sp in zip(prompts, params)]
    want = [ref.generate_ids([p], [sp])[0] for p, sp in zip(prompts, params)]
    assert re.fullmatch("[a-f]{3}-[0-9]{2}", want[3].text)
    assert [c.output_ids for c in got] == [c.output_ids for c in want]
    assert len(want[2].output_ids) == 7 and want[2].output_ids[-1] == 7 and got[2].logprobs is None
    for a, b in zip(got[:2], want[:2]):
        assert [e.logprob for e in a.logprobs] == pytest.approx([e.logprob for e in b.logprobs], abs=1e-5)
        assert [[t for t, _ in e.top] for e in a.logprobs] == [[t for t, _ in e.top] for e in b.logprobs]
    # echo: every prompt token's logprob, wherever the coherent layout's tokens ended
    assert len(got[0].prompt_logprobs) == len(PROMPTS[0]) and got[1].prompt_logprobs is None
    assert [e.logprob for e in got[0].prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in want[0].prompt_logprobs[1:]], abs=1e-5)


def test_replicated_experts_equal_reference(ray_session, models):
    plan = random_plan(6, 3, 2, seed=4, layers=3)  # 8 slots: two experts have a second copy
    assert (plan.logcnt == 2).sum() == 6
    ref = ReferenceEngine.from_pretrained(models["mixtral"], max_seqs=4)
    with deployment(models["mixtral"], 3, plan) as dep:
        lockstep(ref, dep)
        pairs = dep.stats.totals()["layers"][0]["pairs_per_rank"]
        assert all(p > 0 for p in pairs)


@pytest.mark.parametrize("family,ranks", [("qwen2_moe", 2), ("deepseek_v3", 3)])
def test_shared_experts_dense_layers_and_grouped_routing(ray_session, models, family, ranks):
    ref = ReferenceEngine.from_pretrained(models[family], max_seqs=4)
    with deployment(models[family], ranks, placement={"policy": "round_robin"}) as dep:
        assert dep.plan.policy == "round_robin"
        lockstep(ref, dep)


@pytest.mark.parametrize("family,ranks,replicated", [("mixtral", 1, False), ("mixtral", 3, True),
                                                     ("deepseek_v3", 2, False)])
def test_two_micro_batches_equal_reference(ray_session, models, family, ranks, replicated):
    """``batching.overlap: on``: decode steps of >= 2 sequences run as two interleaved
    micro-batches (workers/overlap.py), token for token the reference; each MoE layer then
    has 2 collectives per micro-batch, counted at the call, and the same routing counts."""
    plan = random_plan(6, 3, 2, seed=4, layers=3) if replicated else None
    ref = ReferenceEngine.from_pretrained(models[family], max_seqs=4)
    with deployment(models[family], ranks, plan, batching={"max_seqs": 4, "overlap": "on"}) as dep:
        lockstep(ref, dep)
        steps = dep.stats.per_step
    top_k = Checkpoint(str(models[family])).config.top_k
    assert {s.micro_batches for s in steps} == {1, 2}  # prefill steps run whole
    for s in steps:
        assert {(L.token_collectives, L.metadata_collectives) for L in s.layers} == {(2 * s.micro_batches, 0)}
        assert all(sum(L.pairs_per_rank) == s.tokens * top_k and sum(L.rows_per_rank) >= s.tokens
                   for L in s.layers)


class RayCalls:
    """Counts the actor method calls this process makes through Ray (``ActorMethod._remote``)."""

    def __init__(self, monkeypatch):
        import ray.actor

        self.count = 0
        original = ray.actor.ActorMethod._remote

        def counted(method, *args, **kwargs):
            self.count += 1
            return original(method, *args, **kwargs)

        monkeypatch.setattr(ray.actor.ActorMethod, "_remote", counted)


def test_counts_collectives_bytes_and_no_ray_call_per_step(ray_session, models, monkeypatch):
    """2 token-carrying all-to-alls per MoE layer per step and no metadata exchange (fixed
    capacity: C = T rows to every expert rank), no Ray call on the step path (one channel
    message per actor instead), and routing counts equal to what the recorded routing
    implies; every step in lockstep with the reference (3 ranks, 2 experts each)."""
    ranks = 3
    plan = linear_plan(6, ranks, 3)
    ref = ReferenceEngine.from_pretrained(models["mixtral"], max_seqs=4)
    with deployment(models["mixtral"], ranks, plan) as dep:
        dep.record_trace()
        ray_calls = RayCalls(monkeypatch)
        assert lockstep(ref, dep) > 10
        assert ray_calls.count == 0
        trace_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"raymoe-trace-{os.getpid()}.npz")
        tokens = dep.save_trace(trace_path)
        stats = dep.stats
    import numpy as np

    trace = np.load(trace_path)
    os.unlink(trace_path)
    assert tokens == sum(s.tokens for s in stats.per_step)
    hidden, top_k = 32, 2
    row_bytes = hidden * 4 + 8 * top_k
    for step in stats.per_step:
        assert step.messages == 1 + ranks
        assert [(L.token_collectives, L.metadata_collectives) for L in step.layers] == [(2, 0)] * 3
    for layer, totals in enumerate(dep.stats.totals()["layers"]):
        ranks_of = plan.slot2rank[layer][np.argsort(plan.phy2log[layer])][trace["topk_ids"][:, layer]]  # [T, A]
        rows = sum(len(set(r)) for r in ranks_of.tolist())
        assert totals["rows_per_rank"] == [int((ranks_of == r).any(1).sum()) for r in range(ranks)]
        assert totals["pairs_per_rank"] == np.bincount(ranks_of.ravel(), minlength=ranks).tolist()
        assert sum(totals["rows_per_rank"]) == rows  # a token travels to a rank once
        assert totals["dispatch_bytes"] == ranks * tokens * row_bytes  # C = T rows per rank and step
        assert totals["combine_bytes"] == ranks * tokens * hidden * 4
        assert totals["metadata_bytes"] == 0


def _port_free(address: str) -> bool:
    """No process listens on the port any more (connections in TIME_WAIT may remain)."""
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
            return True
        except OSError:
            return False


def test_shutdown_mid_generation_leaves_no_actors_or_ports(ray_session, models):
    dep = deployment(models["mixtral"], 2, linear_plan(6, 2, 3))
    pids = [w["pid"] for w in ray.get([a.where.remote() for a in dep.actors])]
    actors = list(dep.actors)
    for p in PROMPTS:
        dep.add_request(p, SamplingParams(max_new_tokens=50, ignore_eos=True))
    dep.step()
    dep.step()
    assert dep.has_work()
    dep.shutdown()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.where.remote(), timeout=30)
    assert _port_free(dep.rendezvous)
    # and the next deployment in this process starts cleanly
    with deployment(models["mixtral"], 1, linear_plan(6, 1, 3)) as again:
        assert len(again.generate_ids([[1, 2, 3]], GREEDY)[0].output_ids) == 10


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, its parent just has not reaped it
        return f.read().split()[2] != "Z"


def test_missing_shard_fails_before_any_actor_starts(ray_session, tmp_path):
    save_tiny_model("mixtral", tmp_path, max_shard_size="30KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    before = len(ray.util.list_named_actors(all_namespaces=True))
    started = time.time()
    with pytest.raises(CheckpointError, match=shard.name):
        deployment(tmp_path, 2)
    assert time.time() - started < 5  # reported by the driver, not by a failed actor
    assert len(ray.util.list_named_actors(all_namespaces=True)) == before


def test_plan_must_match_the_model(ray_session, models):
    with pytest.raises(DeploymentConfigError, match="num_experts"):
        deployment(models["mixtral"], 2, linear_plan(8, 2, 3))
    with pytest.raises(DeploymentConfigError, match="num_ranks"):
        deployment(models["mixtral"], 3, linear_plan(6, 2, 3))
