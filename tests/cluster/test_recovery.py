"""Faults made real: an actor's process is SIGKILLed or SIGSTOPped in the middle of
decoding 16 requests, or the plan changes under them. Every request must still finish
with exactly the greedy tokens the reference engine gives with no fault."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch

from raymoe.cluster.config import DeploymentConfigError, parse_config
from raymoe.cluster.coordinator import Deployment
from raymoe.cluster.recovery import StepFailure
from raymoe.placement.plan import PlacementPlan
from tests.plans import linear_plan, random_plan
from raymoe.workers.expert_map import layer_maps, without_ranks
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.replan import plan_moves
from raymoe.workers.sampling import SamplingParams

REQUESTS = 16
PROMPTS = [[(7 * i + j) % 90 + 1 for j in range(3 + i % 5)] for i in range(REQUESTS)]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("mixtral", seed=5)


@pytest.fixture(scope="module")
def expected(model):
    ref = ReferenceEngine.from_pretrained(model, max_seqs=REQUESTS)
    return [c.output_ids for c in ref.generate_ids(PROMPTS, GREEDY)]


def deployment(path, ranks: int = 2, plan=None, **overrides) -> Deployment:
    config = parse_config({"model": str(path), "expert_ranks": ranks, "resources": {"cpus_per_actor": 0.1},
                           "batching": {"max_seqs": REQUESTS}, **overrides})
    return Deployment(config, plan)


def pid_of(dep: Deployment, index: int) -> int:
    return ray.get(dep.actors[index].where.remote())["pid"]


def decode(dep: Deployment, fault=None, at_step: int = 3) -> list[list[int]]:
    """Decode every prompt; ``fault(dep)`` runs between step ``at_step - 1`` and ``at_step``."""
    ids = [dep.add_request(p, GREEDY) for p in PROMPTS]
    done, steps = {}, 0
    while dep.has_work():
        if steps == at_step and fault is not None:
            fault(dep)
        done.update({c.request_id: c.output_ids for c in dep.step().finished})
        steps += 1
    assert steps > at_step, "the fault must land while requests are decoding"
    return [done[i] for i in ids]


def _gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("victim", [1, 0], ids=["expert-rank-0", "front-end"])
def test_sigkill_mid_decode_recovers_with_identical_outputs(ray_session, model, expected, victim):
    """Actor 0 is the front-end (it holds the KV caches), 1.. the expert ranks (the last
    one dies inside a step in the next test)."""
    with deployment(model, 2, linear_plan(6, 2, 3)) as dep:
        pids = [pid_of(dep, i) for i in range(len(dep.actors))]
        outputs = decode(dep, lambda d: os.kill(pids[victim], signal.SIGKILL))
        assert outputs == expected
        assert len(dep.recoveries) == 1
        rec = dep.recoveries[0]
        assert rec.dead == [victim] and rec.replaced == [victim] and rec.hung == []
        assert rec.replayed_seqs == REQUESTS
        assert _gone(pids[victim])
        assert pid_of(dep, victim) != pids[victim]  # a new process took its place
        assert [pid_of(dep, i) for i in range(len(pids)) if i != victim] == [p for i, p in enumerate(pids)
                                                                           if i != victim]  # survivors kept
        print(f"SIGKILL of actor {victim}: noticed in {rec.detect_seconds:.2f} s, recovered in {rec.seconds:.2f} s")


def test_sigkill_during_a_step(ray_session, model, expected):
    """The kill lands while the step's collectives run (a timer fires inside ``step``)."""
    with deployment(model, 2, linear_plan(6, 2, 3)) as dep:
        pid = pid_of(dep, 2)
        outputs = decode(dep, lambda d: threading.Timer(0.005, os.kill, (pid, signal.SIGKILL)).start())
        assert outputs == expected
        assert len(dep.recoveries) == 1 and dep.recoveries[0].replaced == [2]


def _stop(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)


def _kill_quietly(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_hung_ranks_are_detected_by_collective_or_step_timeout_and_replaced(ray_session, model, expected):
    """SIGSTOP: a process lives but never answers.

    One rank stopped: the others' collectives time out (collective_timeout_s, 3 s), they
    return their errors, and after settle_s the silent rank is declared hung, killed and
    replaced. Then, on the same deployment, every actor stopped: no collective can time
    out (none is waiting), so the step timeout (6 s) declares them all hung; all are
    replaced and the step replays."""
    overrides = {"collective_timeout_s": 3, "recovery": {"step_timeout_s": 6, "settle_s": 2}}
    with deployment(model, 2, linear_plan(6, 2, 3), **overrides) as dep:
        pid = pid_of(dep, 1)
        try:
            assert decode(dep, lambda d: _stop([pid])) == expected
            rec = dep.recoveries[0]
            assert len(dep.recoveries) == 1 and rec.hung == [1] and rec.dead == [] and rec.replaced == [1]
            assert _gone(pid)
            print(f"hung rank (collective timeout 3 s): noticed in {rec.detect_seconds:.2f} s, "
                  f"recovered in {rec.seconds:.2f} s")
        finally:
            _kill_quietly([pid])
        pids = [pid_of(dep, i) for i in range(len(dep.actors))]
        try:
            assert decode(dep, lambda d: _stop(pids)) == expected
            rec = dep.recoveries[1]
            assert len(dep.recoveries) == 2 and rec.hung == [0, 1, 2] and rec.replaced == [0, 1, 2]
            assert rec.detect_seconds >= 6
        finally:
            _kill_quietly(pids)


def test_coherent_rank_death_recovers(ray_session, model, expected):
    with deployment(model, 2, linear_plan(6, 2, 3), layout="coherent") as dep:
        pid = pid_of(dep, 1)
        assert decode(dep, lambda d: os.kill(pid, signal.SIGKILL)) == expected
        assert len(dep.recoveries) == 1 and dep.recoveries[0].replaced == [1]


def test_without_recovery_attempts_the_failure_is_raised(ray_session, model):
    with deployment(model, 2, linear_plan(6, 2, 3), recovery={"max_attempts": 0}) as dep:
        pid = pid_of(dep, 1)
        with pytest.raises(StepFailure) as info:
            decode(dep, lambda d: os.kill(pid, signal.SIGKILL))
        assert info.value.dead == [1] and dep.recoveries == []


@pytest.mark.parametrize("layout", ["disaggregated", "coherent"])
def test_live_plan_change_moves_weights_without_corrupting_requests(ray_session, model, expected, layout):
    """Switch from a linear plan to a replicated random one while 16 requests decode."""
    old, new = linear_plan(6, 3, 3), random_plan(6, 3, 2, seed=4, layers=3)
    moved = {}
    with deployment(model, 3, old, layout=layout) as dep:
        assert decode(dep, lambda d: moved.update(d.set_plan(new)), at_step=4) == expected
        assert dep.plan is new and dep.recoveries == []
    # The weights that travelled: every slot of the new plan its rank did not hold before.
    want = sum(1 for o, n in zip(layer_maps(old), layer_maps(new)) for r, sources in enumerate(plan_moves(o, n))
               for src in sources if src != r)
    assert want > 0 and moved["experts"] == want
    c = dep.model_config
    assert moved["bytes"] == want * 3 * c.hidden_size * c.moe_intermediate_size * 4  # float32
    assert moved["collectives"] == 3  # one all-to-all per MoE layer


def test_plan_moves_sources_are_holders():
    old, new = layer_maps(linear_plan(6, 3, 1))[0], layer_maps(random_plan(6, 3, 2, seed=1, layers=1))[0]
    sources = plan_moves(old, new)
    sends = [0, 0, 0]
    for rank, (experts, row) in enumerate(zip(new.rank_experts, sources)):
        assert len(row) == len(experts)
        for expert, src in zip(experts, row):
            assert expert in old.rank_experts[src]  # the source holds the expert under the old plan
            if expert in old.rank_experts[rank]:
                assert src == rank  # never sent when already there
            else:
                sends[src] += 1
    assert sum(sends) > 0
    with pytest.raises(ValueError, match="number of ranks"):
        plan_moves(old, layer_maps(linear_plan(6, 2, 1))[0])


def test_nccl_without_gpus_is_a_config_error(ray_session, model):
    with pytest.raises(DeploymentConfigError, match="backend"):
        deployment(model, 1, linear_plan(6, 1, 3), backend="nccl")


def twice_plan(layers: int = 3) -> PlacementPlan:
    """6 experts on 3 ranks, every expert on two of them: r0 {0,1,2,3}, r1 {2,3,4,5}, r2 {4,5,0,1}."""
    phy2log = np.tile([0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 0, 1], (layers, 1))
    slot2rank = np.tile(np.repeat([0, 1, 2], 4), (layers, 1))
    return PlacementPlan(num_ranks=3, num_nodes=1, num_experts=6, phy2log=phy2log, slot2rank=slot2rank,
                         policy="test", params={}, objectives={})


def test_without_ranks_dispatches_only_to_live_replicas():
    maps = layer_maps(twice_plan(1))
    degraded = without_ranks(maps, {1})[0]
    assert degraded.rank_experts == ((0, 1, 2, 3), (), (4, 5, 0, 1))
    for expert in range(6):
        slots = degraded.log2phy[expert, :degraded.logcnt[expert]]
        assert len(slots) >= 1 and all(int(degraded.slot_rank[s]) != 1 for s in slots)
        assert all(int(maps[0].slot_rank[s]) != 1 for s in slots)
    assert degraded.logcnt.tolist() == [2, 2, 1, 1, 1, 1]
    assert torch.equal(degraded.slot_local, maps[0].slot_local)  # live ranks' stacks need no change
    assert without_ranks(layer_maps(linear_plan(6, 3, 1)), {1}) is None  # experts 2, 3 would have no copy
    assert without_ranks(maps, {0, 2}) is None  # experts 0, 1 only lived there


def test_standby_serves_on_replicas_while_the_dead_rank_reloads(ray_session, model, expected):
    """Expert rank 1 dies; every expert it held has a replica elsewhere, so the standby
    takes its place at once (holding nothing) and steps go on; once the replacement has
    loaded, the full plan is back. Tokens equal the reference throughout."""
    with deployment(model, 3, twice_plan()) as dep:
        assert dep.standby is not None
        pid = pid_of(dep, 2)
        assert decode(dep, lambda d: os.kill(pid, signal.SIGKILL)) == expected
        rec = dep.recoveries[0]
        assert rec.fallback and rec.replaced == [2] and rec.degraded_steps >= 1
        serving_again = rec.seconds
        degraded = [s for s in dep.stats.per_step if all(layer.pairs_per_rank[1] == 0 for layer in s.layers)]
        assert len(degraded) >= rec.degraded_steps  # rank 1 computed nothing while its place was on replicas
        if dep.recoveries[0].restored_seconds is None:  # decoding ended before the replacement was up
            dep.restore()
        rec = dep.recoveries[0]
        assert rec.restored_seconds is not None and dep.standby is not None  # a new standby for the next fault
        before = len(dep.stats.per_step)
        assert decode(dep, None) == expected  # the full plan again: rank 1 computes its experts
        assert all(sum(layer.pairs_per_rank[1] for layer in s.layers) > 0 for s in dep.stats.per_step[before:])
        print(f"fallback: serving again {serving_again:.2f} s after noticing, {rec.degraded_steps} steps on "
              f"replicas, full plan back after {rec.restored_seconds:.2f} s")
