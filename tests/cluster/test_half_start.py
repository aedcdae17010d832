"""A deployment that cannot start leaves nothing behind: bad configs, plans and
checkpoints given to ``Deployment(...)`` raise their typed error, and afterwards the
cluster holds exactly the actors and placement groups it held before."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file, save_file

from raymoe.cluster import coordinator
from raymoe.cluster.bootstrap import ClusterCapacityError, check_capacity
from raymoe.cluster.config import DeploymentConfigError, parse_config
from raymoe.cluster.coordinator import Deployment
from raymoe.placement.errors import PlanError
from raymoe.placement.build import build_plan
from tests.tiny_models import save_tiny_model
from raymoe.workers.model.errors import CheckpointError, ConfigFieldError, RaymoeModelError

ROOT = Path(__file__).resolve().parents[2]
SETTLE_S = 30.0  # how long killed actors and removed placement groups may take to be reported gone


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_tiny_model("mixtral", path, seed=3)  # 6 experts, 3 MoE layers
    return path


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_tensors(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _live() -> tuple[set, set]:
    """(ids of alive actors, ids of placement groups not removed), from the GCS."""
    actors = {a for a, info in ray._private.state.actors().items() if info["State"] != "DEAD"}
    groups = {g for g, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}
    return actors, groups


def _config(model, **overrides):
    return parse_config({"model": str(model), "expert_ranks": 2, "resources": {"cpus_per_actor": 0.1},
                         "batching": {"max_seqs": 2}, **overrides})


def _truncated(good, tmp):
    path = _copy(good, tmp)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    return _config(path)


def _wrong_expert_count(good, tmp):
    path = _copy(good, tmp)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    return _config(path)


def _wrong_shape(good, tmp):
    path = _copy(good, tmp)
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.weight", torch.zeros(16, 32)))
    return _config(path)


def _garbage_plan(good, tmp):
    (tmp / "plan.yaml").write_bytes(b"version: 1\nphy2log: [[\xff")
    return _config(good, placement={"plan": str(tmp / "plan.yaml")})


def _plan_for_other_ranks(good, tmp):
    build_plan("linear", num_layers=3, num_experts=6, num_ranks=3).save(tmp / "plan.yaml")
    return _config(good, placement={"plan": str(tmp / "plan.yaml")})


def _plan_with_huge_header(good, tmp):
    build_plan("linear", num_layers=3, num_experts=6, num_ranks=2).save(tmp / "plan.yaml")
    doc = yaml.safe_load((tmp / "plan.yaml").read_text())
    (tmp / "plan.yaml").write_text(yaml.safe_dump({**doc, "num_ranks": 2**70}))
    return _config(good, placement={"plan": str(tmp / "plan.yaml")})


def _nan_weights_checked(good, tmp):
    path = _copy(good, tmp)
    _edit_tensors(path, lambda t: t["model.layers.2.block_sparse_moe.experts.1.w2.weight"].view(-1).__setitem__(
        0, math.nan))
    return _config(path, check_finite=True)


def _more_cpus_than_the_cluster(good, tmp):
    return _config(good, resources={"cpus_per_actor": 200})  # the session's Ray has 4 CPUs


def _gpus_the_cluster_lacks(good, tmp):
    return _config(good, resources={"cpus_per_actor": 0.1, "gpus_per_actor": 8})  # 24 GPUs: no test machine


CASES = [
    (_truncated, CheckpointError),
    (_wrong_expert_count, ConfigFieldError),
    (_wrong_shape, RaymoeModelError),
    (_garbage_plan, PlanError),
    (_plan_for_other_ranks, DeploymentConfigError),
    (_plan_with_huge_header, PlanError),
    (_nan_weights_checked, CheckpointError),
    (_more_cpus_than_the_cluster, ClusterCapacityError),
    (_gpus_the_cluster_lacks, ClusterCapacityError),
]


@pytest.mark.parametrize("make,error", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_bad_deployment_raises_its_typed_error_and_leaves_nothing(ray_session, good_model, tmp_path, make, error):
    config = make(good_model, tmp_path)
    before = _live()
    with pytest.raises(error):
        Deployment(config)
    deadline = time.time() + SETTLE_S
    while _live() != before and time.time() < deadline:
        time.sleep(0.2)
    actors, groups = _live()
    assert actors <= before[0] and groups <= before[1], (actors - before[0], groups - before[1])


@pytest.mark.parametrize("resources,field,value,needle", [
    ({"cpus_per_actor": 3}, "resources.cpus_per_actor", 3, "3 CPUs per actor x 3 actors (front-end + 2 expert "
     "ranks) = 9 CPUs in all, more than the cluster has: the Ray cluster has 4 CPUs (1 node: 4 CPUs"),
    ({"cpus_per_actor": 0.1, "gpus_per_actor": 8}, "resources.gpus_per_actor", 8, "8 GPUs per actor x 3 actors "
     "(front-end + 2 expert ranks) = 24 GPUs in all, and no node has 8 GPUs"),
])
def test_more_than_the_cluster_has_is_refused_before_any_placement_group(ray_session, good_model, resources, field,
                                                                         value, needle):
    """At once, naming the field, what the config asks and what the cluster has: no
    placement group is ever created (the old path waited 60 s for one that could not be)."""
    before, groups_ever = _live(), set(ray.util.placement_group_table())  # removed ones stay listed
    with pytest.raises(ClusterCapacityError) as info:
        Deployment(_config(good_model, resources=resources))
    error = info.value
    assert (error.field, error.value, error.actors) == (field, value, 3) and needle in str(error), str(error)
    assert isinstance(error, DeploymentConfigError) and "Fix:" in str(error)
    assert _live()[0] <= before[0] and set(ray.util.placement_group_table()) == groups_ever


def test_capacity_check_judges_each_node_the_total_and_strict_pack():
    """The check alone, on injected ``ray.nodes()`` entries: two alive 4-CPU 1-GPU nodes
    (a dead 64-CPU one does not count)."""
    nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}] * 2 + [
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    total = {"CPU": 8.0, "GPU": 2.0}
    check_capacity([{"CPU": 2.0, "GPU": 0.5}] * 4, "PACK", total, nodes)  # fits: 8 CPUs, 2 GPUs
    check_capacity([{"CPU": 0.1}] * 3, "STRICT_PACK", {"CPU": 0.3}, [{"Alive": True, "Resources": {"CPU": 0.3}}])
    assert 0.1 * 3 > 0.3  # ... and still fits, as it does for Ray
    for bundle, strategy, field, needed, available in [({"CPU": 5.0}, "PACK", "resources.cpus_per_actor", 5, 4),
                                                       ({"CPU": 3.0}, "PACK", "resources.cpus_per_actor", 9, 8),
                                                       ({"CPU": 2.0}, "STRICT_PACK", "resources.cpus_per_actor", 6, 4),
                                                       ({"CPU": 1.0, "GPU": 1.0}, "PACK", "resources.gpus_per_actor",
                                                        3, 2)]:
        with pytest.raises(ClusterCapacityError) as info:
            check_capacity([bundle] * 3, strategy, total, nodes, "3 ranks")
        error = info.value
        assert (error.field, error.needed, error.available) == (field, needed, available), str(error)
        assert "(2 nodes: 4 CPUs, 1 GPU; 4 CPUs, 1 GPU)" in str(error)
        back = pickle.loads(pickle.dumps(error))  # Ray carries it out of a Serve replica
        assert type(back) is ClusterCapacityError and str(back) == str(error) and vars(back) == vars(error)


def test_generate_cli_refuses_more_gpus_than_the_cluster_has_in_one_line(ray_session, tmp_path):
    """`raymoe generate --config` joining the test session's Ray through RAY_ADDRESS (no
    GPU asked of a test machine has 8 per actor): exit 2, one line naming the field, no
    traceback."""
    config = tmp_path / "deployment.yaml"
    config.write_text(yaml.safe_dump({"model": str(ROOT / "models" / "tiny-moe"), "expert_ranks": 1,
                                      "resources": {"cpus_per_actor": 0.1, "gpus_per_actor": 8}}))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "raymoe.deploy.cli", "generate", "--config", str(config), "--prompt", "hi",
                           "--max-new-tokens", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("raymoe: error:")]
    assert line.startswith("raymoe: error: config field 'resources.gpus_per_actor' = 8: the deployment asks for 8 "
                           "GPUs per actor x 2 actors (front-end + 1 expert rank) = 16 GPUs in all"), line
    assert "Fix: " in line and "resources.gpus_per_actor: auto" in line


def test_a_good_deployment_starts_after_the_bad_ones(ray_session, good_model):
    with Deployment(_config(good_model)) as dep:
        assert len(dep.actors) == 3


def test_failure_after_the_actors_started_leaves_nothing(ray_session, good_model, tmp_path, monkeypatch):
    """The weights vanish between the driver's checks and the actors' loading: the actors
    die in their constructors, and the deployment kills them and frees its placement group."""
    path = _copy(good_model, tmp_path)
    real = coordinator.load_tokenizer

    def vanish_then_load(model):  # runs after the checks, just before the actors start
        (path / "model.safetensors").unlink()
        return real(model)

    monkeypatch.setattr(coordinator, "load_tokenizer", vanish_then_load)
    before = _live()
    with pytest.raises(ray.exceptions.RayActorError):
        Deployment(_config(path))
    deadline = time.time() + SETTLE_S
    while _live() != before and time.time() < deadline:
        time.sleep(0.2)
    actors, groups = _live()
    assert actors <= before[0] and groups <= before[1], (actors - before[0], groups - before[1])
